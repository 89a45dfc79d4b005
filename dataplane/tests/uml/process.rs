//! The host side of a UML run: the process group that must not outlive the job, the sweep of
//! runs whose test process was killed, and the LD_PRELOAD shim every UML starts with.

use super::{UmlError, harness_dir};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const XSTATE_SHIM_C: &str = include_str!("xstate_shim.c");

/// The running UML: its process group is killed when this drops, whatever happened.
pub(super) struct UmlProcess {
    child: Child,
}

impl UmlProcess {
    pub(super) fn new(child: Child) -> UmlProcess {
        UmlProcess { child }
    }

    /// The exit status, or None if UML was still running at the deadline.
    pub(super) fn wait_until(&mut self, deadline: Instant) -> std::io::Result<Option<ExitStatus>> {
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for UmlProcess {
    fn drop(&mut self) {
        // UML runs its kernel threads and each of its processes as host processes; they all
        // share the group of the one we started (its pid), even after it exited.
        let group = self.child.id();
        kill_group(group);
        let _ = self.child.wait();
        let deadline = Instant::now() + Duration::from_secs(5);
        while group_alive(group) && Instant::now() < deadline {
            kill_group(group);
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn kill_group(group: u32) {
    let _ = Command::new("kill")
        .args(["-KILL", "--", &format!("-{group}")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Whether any process is in process group GROUP (field 5 of /proc/PID/stat).
fn group_alive(group: u32) -> bool {
    let Ok(dir) = std::fs::read_dir("/proc") else { return false };
    dir.flatten().any(|e| {
        let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        // The command name (field 2) is in parentheses and may hold spaces: count after it.
        let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
        after.split_whitespace().nth(2).and_then(|p| p.parse::<u32>().ok()) == Some(group)
    })
}

/// Kills UMLs whose test process is gone, and removes their work directories (a killed run
/// cannot run its destructors; `setpriv --pdeathsig` takes the kernel down with it, but UML's
/// I/O helper processes survive). They are recognised by `umid=kpx-PID-SEQ` on their command
/// line, work directories by their name PID-SEQ.
pub(super) fn sweep_stale() {
    let dead = |owner: u32| owner != std::process::id() && !Path::new(&format!("/proc/{owner}")).exists();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|p| p.parse::<u32>().ok()) else { continue };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let owner = cmdline.split(|&b| b == 0).find_map(|arg| {
            let arg = std::str::from_utf8(arg).ok()?.strip_prefix("umid=kpx-")?;
            arg.split('-').next()?.parse::<u32>().ok()
        });
        if owner.is_some_and(dead) {
            let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).stdin(Stdio::null()).status();
        }
    }
    if let Ok(dir) = std::fs::read_dir(harness_dir()) {
        for entry in dir.flatten() {
            let name = entry.file_name();
            let owner = name.to_str().and_then(|n| n.split_once('-')).and_then(|(pid, _)| pid.parse::<u32>().ok());
            if owner.is_some_and(dead) && entry.path().is_dir() {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
}

/// Builds xstate_shim.c (see its header: bookworm's UML 6.1 cannot start a process on hosts
/// with AVX-512 or AMX without it) once per source version; every UML is started with it.
pub(super) fn xstate_shim() -> Result<PathBuf, UmlError> {
    static SHIM: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let built = SHIM.get_or_init(|| {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        XSTATE_SHIM_C.hash(&mut hasher);
        let dir = harness_dir();
        let so = dir.join(format!("xstate-shim-{:016x}.so", hasher.finish()));
        if so.is_file() {
            return Ok(so);
        }
        std::fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
        // Built under a private name, then renamed: test binaries build it concurrently.
        let tmp = dir.join(format!("xstate-shim-{}.tmp", std::process::id()));
        let src = tmp.with_extension("c");
        std::fs::write(&src, XSTATE_SHIM_C).map_err(|e| format!("write {}: {e}", src.display()))?;
        let out = Command::new("cc")
            .args(["-O2", "-shared", "-fPIC", "-Wall", "-o"])
            .arg(&tmp)
            .arg(&src)
            .arg("-ldl")
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("run cc: {e}"))?;
        let _ = std::fs::remove_file(&src);
        if !out.status.success() {
            return Err(format!("cc failed: {}", String::from_utf8_lossy(&out.stderr).trim()));
        }
        std::fs::rename(&tmp, &so).map_err(|e| format!("rename to {}: {e}", so.display()))?;
        Ok(so)
    });
    built.clone().map_err(|e| UmlError::Io { what: "build the XSAVE shim".into(), source: std::io::Error::other(e) })
}
