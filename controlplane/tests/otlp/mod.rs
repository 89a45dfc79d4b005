//! A real OTLP trace receiver for tests: `receiver.py` (beside this file), on the official
//! opentelemetry-proto service definitions, writing every span it receives as a JSON line.
//! Shared by the controlplane's trace test and the dataplane's IPVS agent test (which
//! includes this file by path), so the script travels inside the test binary.
//!
//! It needs `python3 -m pip install opentelemetry-proto grpcio` (`.ci/run` installs them).
//! Without them [`available`] prints a loud skip message, except under CI=true, where it fails.

#![allow(dead_code)] // Each including test uses a part.

use serde_json::Value;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const SCRIPT: &str = include_str!("receiver.py");

/// The python interpreter to run the receiver with: `KPX_TEST_PYTHON` (set for tests that
/// run the receiver where `PATH` differs, inside user-mode Linux) or `python3`.
fn python() -> String {
    std::env::var("KPX_TEST_PYTHON").unwrap_or_else(|_| "python3".to_string())
}

/// The absolute path of a python that has what the receiver needs, or None (after a loud skip
/// message; a panic under CI=true).
pub fn interpreter() -> Option<String> {
    let script = "import sys, grpc, opentelemetry.proto.collector.trace.v1.trace_service_pb2_grpc; \
                  print(sys.executable)";
    let out = Command::new(python()).args(["-c", script]).stderr(Stdio::null()).output();
    let found = out.ok().filter(|o| o.status.success()).map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    if found.is_none() {
        let hint = "the OTLP test receiver needs python3 with opentelemetry-proto and grpcio \
                    (python3 -m pip install opentelemetry-proto grpcio)";
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("CI=true and {hint}");
        }
        let _ = writeln!(std::io::stderr(), "\n**********\nSKIPPED: {hint}\n**********");
    }
    found
}

/// Whether python3 has what the receiver needs (see [`interpreter`]).
pub fn available() -> bool {
    interpreter().is_some()
}

/// A running receiver; killed on drop.
pub struct Receiver {
    child: Child,
    pub port: u16,
    spans: PathBuf,
}

impl Receiver {
    /// Starts the receiver, writing its script and spans into `dir`; returns once it listens.
    pub fn start(dir: &Path) -> Receiver {
        let script = dir.join("otlp_receiver.py");
        std::fs::write(&script, SCRIPT).expect("write the receiver script");
        let spans = dir.join("spans.jsonl");
        let mut child = Command::new(python())
            .arg(&script)
            .arg(&spans)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn python3 receiver.py");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).expect("read the receiver's port");
        let port = line.trim().strip_prefix("listening on ").and_then(|p| p.parse().ok());
        let port = port.unwrap_or_else(|| panic!("receiver said {line:?} instead of its port"));
        Receiver { child, port, spans }
    }

    /// `OTEL_EXPORTER_OTLP_ENDPOINT` for exporters, and a 100 ms batch delay so that spans
    /// arrive quickly.
    pub fn env(&self) -> [(&'static str, String); 2] {
        [
            ("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://127.0.0.1:{}", self.port)),
            ("OTEL_BSP_SCHEDULE_DELAY", "100".to_string()),
        ]
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<Value> {
        let text = std::fs::read_to_string(&self.spans).unwrap_or_default();
        text.lines().map(|l| serde_json::from_str(l).expect("receiver writes JSON lines")).collect()
    }

    /// The spans once `done` says they are complete, or a panic with all of them after `wait`.
    pub fn wait_for(&self, wait: Duration, what: &str, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        let deadline = Instant::now() + wait;
        loop {
            let spans = self.spans();
            if done(&spans) {
                return spans;
            }
            assert!(Instant::now() < deadline, "no {what} after {wait:?}; spans received:\n{spans:#?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The raw JSON lines (for failure messages).
    pub fn raw(&self) -> String {
        std::fs::read_to_string(&self.spans).unwrap_or_default()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A span's attribute (`null` when absent).
pub fn attr<'a>(span: &'a Value, key: &str) -> &'a Value {
    &span["attributes"][key]
}
