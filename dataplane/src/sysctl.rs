//! The kernel settings kube-proxy tunes at startup besides its rules: the conntrack table size
//! and timeouts (`conntrack.*` of its configuration, `--conntrack-*` flags). What to write is
//! pure ([`conntrack_writes`]); [`apply`] writes it, in the agent's network namespace or (tests)
//! the one named, and reports each write that failed without stopping: a read-only /proc/sys
//! (a container without the privilege, or nf_conntrack_max outside the initial namespace) must
//! not keep the proxy from running, as with kube-proxy.

use std::time::Duration;

use crate::backend::iptables::exec::Runner;
use crate::config::Conntrack;

/// One setting: its /proc/sys key (slashes) and value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Write {
    pub key: String,
    pub value: String,
}

impl Write {
    fn new(key: &str, value: impl ToString) -> Write {
        Write { key: key.to_string(), value: value.to_string() }
    }
}

/// kube-proxy's conntrack settings: nf_conntrack_max = max(maxPerCore x CPUs, min) when
/// maxPerCore is set and not 0; each non-zero timeout in seconds; tcp_be_liberal when true.
pub fn conntrack_writes(c: &Conntrack, cpus: usize) -> Vec<Write> {
    let mut out = Vec::new();
    if let Some(per_core) = c.max_per_core.filter(|n| *n > 0) {
        let max = (u64::from(per_core) * cpus as u64).max(u64::from(c.min.unwrap_or(0)));
        out.push(Write::new("net/netfilter/nf_conntrack_max", max));
    }
    let secs = |d: Option<Duration>| d.filter(|d| !d.is_zero()).map(|d| d.as_secs().max(1));
    let timeouts = [
        ("net/netfilter/nf_conntrack_tcp_timeout_established", c.tcp_established_timeout),
        ("net/netfilter/nf_conntrack_tcp_timeout_close_wait", c.tcp_close_wait_timeout),
        ("net/netfilter/nf_conntrack_udp_timeout", c.udp_timeout),
        ("net/netfilter/nf_conntrack_udp_timeout_stream", c.udp_stream_timeout),
    ];
    for (key, d) in timeouts {
        if let Some(s) = secs(d) {
            out.push(Write::new(key, s));
        }
    }
    if c.tcp_be_liberal == Some(true) {
        out.push(Write::new("net/netfilter/nf_conntrack_tcp_be_liberal", 1));
    }
    out
}

/// Writes each setting (those already at their value are left); returns the failures.
pub fn apply(writes: &[Write], netns: Option<&str>) -> Vec<String> {
    let mut failed = Vec::new();
    for w in writes {
        let result = match netns {
            // /proc/sys/net shows the namespace of the process that opens it.
            Some(ns) => Runner { netns: Some(ns.to_string()) }
                .run_ok(&["sysctl", "-q", "-w", &format!("{}={}", w.key.replace('/', "."), w.value)], &[])
                .map(|_| ())
                .map_err(|e| e.to_string()),
            None => {
                let path = format!("/proc/sys/{}", w.key);
                if std::fs::read_to_string(&path).is_ok_and(|v| v.trim() == w.value) {
                    Ok(())
                } else {
                    std::fs::write(&path, &w.value).map_err(|e| format!("write {path}: {e}"))
                }
            }
        };
        match result {
            Ok(()) => tracing::info!(key = %w.key, value = %w.value, "sysctl set"),
            Err(error) => {
                tracing::warn!(key = %w.key, value = %w.value, %error, "cannot set sysctl");
                failed.push(format!("{}={}: {error}", w.key, w.value));
            }
        }
    }
    failed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kube_proxy_defaults_and_overrides() {
        let defaults = Conntrack {
            max_per_core: Some(32768),
            min: Some(131072),
            tcp_established_timeout: Some(Duration::from_secs(86400)),
            tcp_close_wait_timeout: Some(Duration::from_secs(3600)),
            ..Conntrack::default()
        };
        let w = conntrack_writes(&defaults, 2);
        assert_eq!(w[0], Write::new("net/netfilter/nf_conntrack_max", 131072), "the minimum wins on 2 CPUs");
        assert_eq!(w[1], Write::new("net/netfilter/nf_conntrack_tcp_timeout_established", 86400));
        assert_eq!(w[2], Write::new("net/netfilter/nf_conntrack_tcp_timeout_close_wait", 3600));
        assert_eq!(w.len(), 3);
        assert_eq!(conntrack_writes(&defaults, 8)[0].value, "262144");
        // 0 leaves the kernel's values; 1.29's settings when given.
        let zero = Conntrack {
            max_per_core: Some(0),
            tcp_established_timeout: Some(Duration::ZERO),
            udp_timeout: Some(Duration::from_secs(30)),
            tcp_be_liberal: Some(true),
            ..Conntrack::default()
        };
        let keys: Vec<String> = conntrack_writes(&zero, 4).into_iter().map(|w| w.key).collect();
        assert_eq!(keys, ["net/netfilter/nf_conntrack_udp_timeout", "net/netfilter/nf_conntrack_tcp_be_liberal"]);
        assert!(conntrack_writes(&Conntrack::default(), 4).is_empty());
    }
}
