//! Bulk transfers through a service: `kpx-testpod transfer` (a client) against `kpx-testpod
//! echo-serve` pods, and what they reported.

#![allow(dead_code)]

use crate::netns::{NetNs, NsChild, Pod, TESTPOD};
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::Stdio;

/// What `transfer` printed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Done {
    Ok { pod: String, server_count: u64, sent: String, echo: String, server: String },
    Error(String),
}

impl Done {
    fn parse(line: &str) -> Done {
        let f: Vec<&str> = line.split_whitespace().collect();
        match f[..] {
            ["ok", pod, count, sent, echo, server] => Done::Ok {
                pod: pod.into(),
                server_count: count.parse().unwrap_or_else(|e| panic!("{line:?}: {e}")),
                sent: sent.into(),
                echo: echo.into(),
                server: server.into(),
            },
            _ if line.starts_with("error ") => Done::Error(line.to_string()),
            _ => panic!("kpx-testpod transfer printed {line:?}"),
        }
    }

    /// The pod that echoed, after checking that all BYTES arrived both ways intact.
    pub fn verified(&self, bytes: u64) -> &str {
        match self {
            Done::Ok { pod, server_count, sent, echo, server } => {
                assert_eq!(*server_count, bytes, "bytes the pod received");
                assert_eq!(sent, server, "checksum of what the pod received");
                assert_eq!(sent, echo, "checksum of the echo");
                pod
            }
            Done::Error(e) => panic!("transfer failed: {e}"),
        }
    }
}

/// Starts the echo server on POD (every address, PORT) and waits until it is ready.
pub fn echo_serve(pod: &Pod, port: u16) -> NsChild {
    let addrs: Vec<String> = pod.ips().iter().map(|ip| SocketAddr::new(*ip, port).to_string()).collect();
    let mut argv = vec![TESTPOD, "echo-serve", pod.name.as_str()];
    argv.extend(addrs.iter().map(String::as_str));
    let mut child = pod.ns.spawn(&argv);
    let mut line = String::new();
    let stdout = child.child_mut().stdout.as_mut().expect("piped stdout");
    BufReader::new(stdout).read_line(&mut line).expect("read echo-serve's first line");
    assert_eq!(line.trim(), "ready", "echo-serve on {}", pod.name);
    child
}

/// One transfer of BYTES from NS to ADDR, to its end.
pub fn transfer(ns: &NetNs, addr: SocketAddr, bytes: u64) -> Done {
    let out = ns.run(&[TESTPOD, "transfer", &addr.to_string(), "--bytes", &bytes.to_string()]);
    Done::parse(out.trim())
}

/// A transfer that stops after PAUSE_AFTER bytes until [`Paused::resume`].
pub struct Paused {
    child: NsChild,
    out: BufReader<std::process::ChildStdout>,
}

impl Paused {
    pub fn start(ns: &NetNs, addr: SocketAddr, bytes: u64, pause_after: u64) -> Paused {
        let argv = [
            TESTPOD,
            "transfer",
            &addr.to_string(),
            "--bytes",
            &bytes.to_string(),
            "--pause-after",
            &pause_after.to_string(),
        ];
        let mut cmd = ns.command(&argv);
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::inherit());
        let mut child = ns.spawn_command(cmd);
        let out = BufReader::new(child.child_mut().stdout.take().expect("piped stdout"));
        let mut p = Paused { child, out };
        let line = p.line();
        assert!(line.starts_with("paused "), "expected the transfer to pause, got {line:?}");
        p
    }

    fn line(&mut self) -> String {
        let mut line = String::new();
        self.out.read_line(&mut line).expect("read transfer's output");
        line.trim().to_string()
    }

    /// Lets it finish; what it reported.
    pub fn resume(mut self) -> Done {
        let stdin = self.child.child_mut().stdin.as_mut().expect("piped stdin");
        stdin.write_all(b"go\n").expect("resume the transfer");
        let line = self.line();
        Done::parse(&line)
    }
}
