//! Running the iptables tools: argv and stdin only, never a shell, so nothing that comes from
//! the cluster can ever be interpreted as a command. For tests a command can run inside a
//! network namespace (`ip netns exec NAME cmd ...`, again as argv).

use std::io::Write;
use std::process::{Command, Stdio};

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("cannot run {cmd}: {source}")]
    Spawn {
        cmd: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{cmd} failed ({status}): {stderr}")]
    Failed { cmd: String, status: String, stderr: String },
}

/// The output of a command that ran (whatever its exit status).
#[derive(Debug)]
pub struct Ran {
    pub success: bool,
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// Where commands run: on the host's network namespace, or (tests) in a named one.
#[derive(Debug, Clone, Default)]
pub struct Runner {
    pub netns: Option<String>,
}

impl Runner {
    fn command(&self, argv: &[&str]) -> Command {
        let mut c = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns.as_str()]).args(argv);
                c
            }
            None => {
                let mut c = Command::new(argv[0]);
                c.args(&argv[1..]);
                c
            }
        };
        c.env("LC_ALL", "C");
        c
    }

    /// Runs `argv`, feeding `stdin` (written piece by piece, so a large restore input is never
    /// copied into one buffer) and collecting stdout and stderr.
    pub fn run(&self, argv: &[&str], stdin: &[&str]) -> Result<Ran, ExecError> {
        let cmd = argv.join(" ");
        let mut child = self
            .command(argv)
            .stdin(if stdin.is_empty() { Stdio::null() } else { Stdio::piped() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| ExecError::Spawn { cmd: cmd.clone(), source })?;
        // Write stdin from another thread: a child that fills its stderr pipe before it has
        // read all of its input would otherwise deadlock with us.
        let output = std::thread::scope(|s| {
            if let Some(pipe) = child.stdin.take() {
                // Buffered when there are many pieces (a full sync on legacy is written as ~100k
                // of them: apply/order.rs). The buffer is allocated here, not in the short-lived
                // writer thread, whose allocator pages would outlive it.
                let capacity = if stdin.len() > 64 { 64 << 10 } else { 0 };
                let mut pipe = std::io::BufWriter::with_capacity(capacity, pipe);
                s.spawn(move || {
                    for piece in stdin {
                        // A child that exits early closes the pipe; its status tells why.
                        if pipe.write_all(piece.as_bytes()).is_err() {
                            return;
                        }
                    }
                    let _ = pipe.flush(); // then closed: the child reads its end of input
                });
            }
            child.wait_with_output()
        })
        .map_err(|source| ExecError::Spawn { cmd: cmd.clone(), source })?;
        Ok(Ran {
            success: output.status.success(),
            code: output.status.code(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        })
    }

    /// Runs `argv` and fails unless it exits 0.
    pub fn run_ok(&self, argv: &[&str], stdin: &[&str]) -> Result<Ran, ExecError> {
        let ran = self.run(argv, stdin)?;
        if ran.success {
            Ok(ran)
        } else {
            Err(ExecError::Failed {
                cmd: argv.join(" "),
                status: ran.code.map_or_else(|| "killed".to_string(), |c| format!("exit {c}")),
                stderr: ran.stderr,
            })
        }
    }
}
