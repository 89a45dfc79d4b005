//! Bulk TCP transfers with checksums, for the userspace proxy's tests:
//!
//! ```text
//! kpx-testpod echo-serve NAME ADDR:PORT...   echoes every byte; after the client's half-close,
//!                                            sends the trailer "NAME COUNT HASH" (the bytes it
//!                                            received and their xxh3-64) and closes
//! kpx-testpod transfer ADDR:PORT --bytes N [--pause-after M]
//!                                            sends N bytes and reads their echo at the same time,
//!                                            then half-closes and reads the trailer; prints
//!                                            "ok NAME N SENT_HASH ECHO_HASH SERVER_HASH", or
//!                                            "error KIND DETAIL". With --pause-after, prints
//!                                            "paused" once M bytes went out and waits for a line
//!                                            on stdin before sending the rest.
//! ```
//!
//! The data is a pseudo-random 1 MiB block sent over and over, each copy stamped with its
//! index, so a lost, repeated or reordered block changes the hash.

use std::io::ErrorKind;
use std::net::SocketAddr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use xxhash_rust::xxh3::Xxh3;

const BLOCK: usize = 1 << 20;

pub async fn echo_serve(args: &[String]) -> Result<(), String> {
    let [name, addrs @ ..] = args else { return Err(super::USAGE.to_string()) };
    let mut tasks = tokio::task::JoinSet::new();
    for addr in addrs {
        let addr: SocketAddr = addr.parse().map_err(|e| format!("bad address {addr:?}: {e}"))?;
        let listener = TcpListener::bind(addr).await.map_err(|e| format!("tcp bind {addr}: {e}"))?;
        let name = name.clone();
        tasks.spawn(async move {
            loop {
                let Ok((conn, _)) = listener.accept().await else { continue };
                tokio::spawn(echo(conn, name.clone()));
            }
        });
    }
    println!("ready");
    super::until_signalled().await?;
    tasks.abort_all();
    Ok(())
}

async fn echo(mut conn: TcpStream, name: String) -> std::io::Result<()> {
    let mut buf = vec![0u8; 256 * 1024];
    let mut hash = Xxh3::new();
    let mut count = 0u64;
    loop {
        let n = conn.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        hash.update(&buf[..n]);
        count += n as u64;
        conn.write_all(&buf[..n]).await?;
    }
    // The client half-closed: this direction is still open.
    conn.write_all(format!("{name} {count} {:016x}\n", hash.digest()).as_bytes()).await?;
    conn.shutdown().await
}

/// The test data: a seeded pseudo-random block (xorshift64).
fn block() -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..BLOCK / 8)
        .flat_map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()
        })
        .collect()
}

pub async fn transfer(args: &[String]) -> Result<(), String> {
    let [addr, rest @ ..] = args else { return Err(super::USAGE.to_string()) };
    let addr: SocketAddr = addr.parse().map_err(|e| format!("bad address {addr:?}: {e}"))?;
    let (mut bytes, mut pause_after) = (None, None);
    let mut it = rest.iter();
    while let Some(flag) = it.next() {
        let value: u64 = it.next().and_then(|v| v.parse().ok()).ok_or_else(|| format!("{flag} needs a number"))?;
        match flag.as_str() {
            "--bytes" => bytes = Some(value),
            "--pause-after" => pause_after = Some(value),
            _ => return Err(super::USAGE.to_string()),
        }
    }
    let total = bytes.ok_or("--bytes is required")?;
    match run_transfer(addr, total, pause_after).await {
        Ok(line) => println!("ok {line}"),
        Err(e) => {
            let kind = match e.kind() {
                ErrorKind::ConnectionRefused => "refused",
                ErrorKind::ConnectionReset | ErrorKind::BrokenPipe | ErrorKind::ConnectionAborted => "reset",
                ErrorKind::UnexpectedEof => "truncated",
                _ => "other",
            };
            println!("error {kind} {e}");
        }
    }
    Ok(())
}

async fn run_transfer(addr: SocketAddr, total: u64, pause_after: Option<u64>) -> std::io::Result<String> {
    let conn = TcpStream::connect(addr).await?;
    let (mut rd, mut wr) = conn.into_split();
    let writer = async move {
        let mut data = block();
        let mut hash = Xxh3::new();
        let (mut sent, mut index, mut paused) = (0u64, 0u64, false);
        while sent < total {
            if let Some(p) = pause_after.filter(|p| sent >= *p && !paused) {
                paused = true;
                println!("paused {p}");
                // Blocking stdin on its own thread (tokio's io-std is not enabled here).
                tokio::task::spawn_blocking(|| std::io::stdin().read_line(&mut String::new()))
                    .await
                    .map_err(std::io::Error::other)??;
            }
            data[..8].copy_from_slice(&index.to_le_bytes());
            let n = (total - sent).min(BLOCK as u64) as usize;
            wr.write_all(&data[..n]).await?;
            hash.update(&data[..n]);
            sent += n as u64;
            index += 1;
        }
        wr.shutdown().await?;
        Ok::<u64, std::io::Error>(hash.digest())
    };
    let reader = async move {
        let mut buf = vec![0u8; 256 * 1024];
        let mut hash = Xxh3::new();
        let mut echoed = 0u64;
        while echoed < total {
            let want = (total - echoed).min(buf.len() as u64) as usize;
            let n = rd.read(&mut buf[..want]).await?;
            if n == 0 {
                return Err(std::io::Error::new(ErrorKind::UnexpectedEof, format!("echo ended after {echoed} bytes")));
            }
            hash.update(&buf[..n]);
            echoed += n as u64;
        }
        let mut trailer = String::new();
        rd.read_to_string(&mut trailer).await?;
        Ok::<(u64, String), std::io::Error>((hash.digest(), trailer))
    };
    let (sent_hash, (echo_hash, trailer)) = tokio::try_join!(writer, reader)?;
    let fields: Vec<&str> = trailer.split_whitespace().collect();
    let [name, count, server_hash] = fields[..] else {
        return Err(std::io::Error::new(ErrorKind::UnexpectedEof, format!("bad trailer {trailer:?}")));
    };
    Ok(format!("{name} {count} {sent_hash:016x} {echo_hash:016x} {server_hash}"))
}
