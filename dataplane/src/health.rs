//! `/healthz` and `/livez`: is this node's proxy doing its job?
//!
//! Semantics (kube-proxy's, adapted to a pushed state):
//!
//! - **200** once a sync has succeeded and nothing has been failing for longer than the
//!   timeout (2 × the agent's sync period): the kernel holds the last state the node accepted.
//!   A lost controlplane does not make the node unhealthy — the rules stay as they are (fail
//!   static) and a new controlplane sends only what changed.
//! - **200** during the startup grace (one timeout after start) before the first sync.
//! - **503** when an update, or a repair (full resync after a flush), has kept failing for
//!   longer than the timeout, or when no sync succeeded within the grace after startup.
//!
//! `/readyz`: **200** once the node has applied an update from the controlplane successfully
//! (its rules reflect the cluster), **503** before. It stays 200 afterwards: a node that has
//! programmed the cluster's state keeps serving it when the controlplane goes away.
//!
//! The JSON body is kube-proxy's: `{"lastUpdated": T,"currentTime": T, "nodeName": N}`. As in
//! kube-proxy, `lastUpdated` is the current time when healthy (older clients read a recent
//! `lastUpdated` as "the sync loop runs"); when unhealthy it is the last successful sync, or
//! empty if there was none.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use crate::http::{self, Reply};

#[derive(Debug, Clone, Copy, Default)]
struct Inner {
    last_success: Option<(Instant, SystemTime)>,
    /// Since when something has been failing without a success in between.
    failing_since: Option<Instant>,
}

#[derive(Debug)]
pub struct Health {
    pub node_name: String,
    pub timeout: Duration,
    started: Instant,
    inner: Mutex<Inner>,
    ready: AtomicBool,
}

/// The decision, pure: see the module doc.
pub fn is_healthy(
    now: Instant,
    started: Instant,
    last_success: Option<Instant>,
    failing_since: Option<Instant>,
    timeout: Duration,
) -> bool {
    if failing_since.is_some_and(|f| now.duration_since(f) >= timeout) {
        return false;
    }
    last_success.is_some() || now.duration_since(started) < timeout
}

impl Health {
    pub fn new(node_name: &str, timeout: Duration) -> Self {
        Health {
            node_name: node_name.to_string(),
            timeout,
            started: Instant::now(),
            inner: Mutex::default(),
            ready: AtomicBool::new(false),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn succeeded(&self) {
        let mut i = self.lock();
        i.last_success = Some((Instant::now(), SystemTime::now()));
        i.failing_since = None;
    }

    /// An update from the controlplane was applied: the node is ready (for good).
    pub fn applied(&self) {
        self.ready.store(true, Ordering::Relaxed);
    }

    pub fn ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    pub fn failed(&self) {
        self.lock().failing_since.get_or_insert_with(Instant::now);
    }

    pub fn healthy(&self) -> bool {
        let i = *self.lock();
        is_healthy(Instant::now(), self.started, i.last_success.map(|s| s.0), i.failing_since, self.timeout)
    }

    pub fn last_success(&self) -> Option<SystemTime> {
        self.lock().last_success.map(|s| s.1)
    }

    /// The `/healthz`, `/livez` and `/readyz` response.
    pub fn reply(&self, path: &str) -> Reply {
        if path == "/readyz" {
            let headers = [("Content-Type", "text/plain; charset=utf-8".to_string())];
            return match self.ready() {
                true => http::reply(200, &headers, "ok\n".into()),
                false => http::reply(503, &headers, "not ready: no update from the controlplane applied yet\n".into()),
            };
        }
        if path != "/healthz" && path != "/livez" {
            return http::not_found();
        }
        let healthy = self.healthy();
        let now = SystemTime::now();
        let last = if healthy { Some(now) } else { self.last_success() };
        let body = format!(
            "{{\"lastUpdated\": {},\"currentTime\": {}, \"nodeName\": {}}}",
            json_str(&last.map(rfc3339).unwrap_or_default()),
            json_str(&rfc3339(now)),
            json_str(&self.node_name)
        );
        let headers =
            [("Content-Type", "application/json".to_string()), ("X-Content-Type-Options", "nosniff".to_string())];
        http::reply(if healthy { 200 } else { 503 }, &headers, body)
    }
}

/// A JSON string literal.
pub fn json_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// UTC time as RFC 3339 with milliseconds ("2026-11-23T03:43:47.123Z").
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_decision() {
        let t = Duration::from_secs(60);
        let start = Instant::now();
        let at = |s: u64| start + Duration::from_secs(s);
        // Startup grace, then unhealthy without any sync.
        assert!(is_healthy(at(10), start, None, None, t));
        assert!(!is_healthy(at(61), start, None, None, t));
        // Synced once, idle for hours (or the controlplane is gone): in sync, healthy.
        assert!(is_healthy(at(7200), start, Some(at(5)), None, t));
        // Failing for a while is tolerated, for too long it is not.
        assert!(is_healthy(at(100), start, Some(at(5)), Some(at(50)), t));
        assert!(!is_healthy(at(110), start, Some(at(5)), Some(at(50)), t));
        // A failure at startup also ends the grace once it lasts a timeout.
        assert!(!is_healthy(at(70), start, None, Some(at(1)), t));
    }

    #[test]
    fn healthz_body_and_status() {
        let h = Health::new("node-a", Duration::from_secs(60));
        let r = h.reply("/healthz");
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["content-type"], "application/json");
        assert_eq!(r.headers()["x-content-type-options"], "nosniff");
        assert_eq!(h.reply("/other").status(), 404);
        let h = Health::new("node-a", Duration::ZERO);
        assert_eq!(h.reply("/livez").status(), 503);
        h.succeeded();
        assert_eq!(h.reply("/livez").status(), 200);
        // Ready only once an update was applied.
        assert_eq!(h.reply("/readyz").status(), 503);
        h.applied();
        assert_eq!(h.reply("/readyz").status(), 200);
    }

    #[test]
    fn formats() {
        assert_eq!(rfc3339(SystemTime::UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_795_405_427_123);
        assert_eq!(rfc3339(t), "2026-11-23T03:43:47.123Z");
        assert_eq!(json_str("a\"b\\c\n"), "\"a\\\"b\\\\c\\u000a\"");
    }
}
