//! `--backend ipvs` on a kernel without IPVS (this host, CI): the agent says so and runs the
//! iptables backend, or with `--no-ipvs-fallback` exits 1 with a clear message. On a kernel
//! that has IPVS the agent must pick it instead.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use kpx_ipvs_netlink::{IpvsClient, IpvsError};

fn agent(extra: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kpx-dataplane"));
    c.args(["--node", "n1", "--controlplane", "http://127.0.0.1:1", "--backend", "ipvs"])
        .args(["--healthz-bind-address", "127.0.0.1:0", "--metrics-bind-address", "127.0.0.1:0"])
        .args(extra)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    c
}

fn host_has_ipvs() -> bool {
    match IpvsClient::new() {
        Ok(_) => true,
        Err(IpvsError::Unavailable) => false,
        Err(e) => panic!("probing IPVS: {e}"),
    }
}

/// Waits (at most 20 s) for a stderr line containing `want`; returns everything read.
fn wait_for_line(child: &mut std::process::Child, want: &'static str) -> (bool, String) {
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let found = line.contains(want);
            if tx.send(line).is_err() || found {
                break;
            }
        }
    });
    let mut seen = String::new();
    while let Ok(line) = rx.recv_timeout(Duration::from_secs(20)) {
        seen.push_str(&line);
        seen.push('\n');
        if line.contains(want) {
            return (true, seen);
        }
    }
    (false, seen)
}

#[test]
fn without_ipvs_the_agent_falls_back_to_iptables() {
    let ipvs = host_has_ipvs();
    let mut child = agent(&[]).spawn().expect("start kpx-dataplane");
    let want = if ipvs { "ipvs backend" } else { "iptables backend" };
    let (found, seen) = wait_for_line(&mut child, want);
    let _ = child.kill();
    let _ = child.wait();
    assert!(found, "no {want:?} line; stderr:\n{seen}");
    if !ipvs {
        assert!(seen.contains("ipvs backend unavailable: falling back to the iptables backend"), "{seen}");
        assert!(seen.contains("IPVS is not available in this kernel"), "the reason is not logged:\n{seen}");
    }
}

#[test]
fn without_ipvs_no_ipvs_fallback_exits_1() {
    if host_has_ipvs() {
        eprintln!("this kernel has IPVS: nothing to fall back from (the test above checks IPVS is chosen)");
        return;
    }
    let out = agent(&["--no-ipvs-fallback"]).output().expect("run kpx-dataplane");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr:\n{stderr}");
    assert!(
        stderr.contains("backend ipvs is not usable on this node and --no-ipvs-fallback is set")
            && stderr.contains("IPVS is not available in this kernel"),
        "{stderr}"
    );
}
