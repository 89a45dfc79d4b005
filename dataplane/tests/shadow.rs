//! `--backend shadow` end to end: the controlplane (file source) serves a conformance case's
//! cluster, the real `kpx-dataplane --backend shadow` runs as its node against a network
//! namespace holding (1) the rules the real kube-proxy v1.28.7 wrote for that cluster, (2) the
//! rules kpx's own iptables backend writes, (3) a hand-altered copy of the first. It must find
//! no difference in (1) and (2), exactly the alterations in (3), report them in the admin API
//! and the metrics, and never change a rule.

mod conformance;
mod netns;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use kpx_controlplane::cache::CacheConfig;
use kpx_controlplane::model::Skips;
use kpx_controlplane::server::SyncConfig;
use kpx_controlplane::source::files::FileSource;
use kpx_dataplane::backend::iptables::{IptablesBackend, IptablesConfig};
use kpx_dataplane::state::ChangeSet;
use kpx_dataplane::stream::Apply;
use kpx_proto::v1 as pb;
use netns::{NetNs, eventually};

/// The shadow agent, killed on drop (its log printed if the test failed).
struct Shadow {
    child: Child,
    log: PathBuf,
    admin: String,
    metrics: String,
}

impl Drop for Shadow {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- shadow log:\n{}", std::fs::read_to_string(&self.log).unwrap_or_default());
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

struct Controlplane {
    rt: tokio::runtime::Runtime,
    url: String,
    _stop: tokio::sync::oneshot::Sender<()>,
    _dir: tempfile::TempDir,
}

fn controlplane(case: &conformance::Case) -> Controlplane {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("cluster.yaml"), case.read("cluster.yaml")).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let skips = Arc::new(Skips::default());
    let source = Box::new(FileSource::new(dir.path().to_path_buf(), skips.clone()));
    rt.spawn(kpx_controlplane::serve(listener, source, skips, CacheConfig::default(), SyncConfig::default(), async {
        let _ = stopped.await;
    }));
    Controlplane { rt, url, _stop: stop, _dir: dir }
}

fn start_shadow(case: &conformance::Case, cp: &Controlplane, ns: &NetNs, work: &std::path::Path) -> Shadow {
    let (admin, metrics, healthz) = (free_port(), free_port(), free_port());
    let log = work.join(format!("{}.log", ns.name()));
    let child = Command::new(env!("CARGO_BIN_EXE_kpx-dataplane"))
        .args(["--backend", "shadow", "--node", &case.node(), "--controlplane", &cp.url])
        .args(["--netns", ns.name(), "--cluster-cidr", &case.flag("cluster-cidr").unwrap(), "--sync-period", "200ms"])
        .args(["--admin-listen", &format!("127.0.0.1:{admin}")])
        .args(["--metrics-bind-address", &format!("127.0.0.1:{metrics}")])
        .args(["--healthz-bind-address", &format!("127.0.0.1:{healthz}")])
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    Shadow { child, log, admin: format!("http://127.0.0.1:{admin}"), metrics: format!("127.0.0.1:{metrics}") }
}

fn status(cp: &Controlplane, shadow: &Shadow) -> Option<pb::DataplaneStatus> {
    let url = shadow.admin.clone();
    cp.rt.block_on(async move {
        let mut c = pb::admin_client::AdminClient::connect(url).await.ok()?;
        Some(c.get_status(pb::GetStatusRequest {}).await.ok()?.into_inner())
    })
}

/// Waits for a comparison made after `since_ms` and returns it.
fn compared_after(cp: &Controlplane, shadow: &Shadow, since_ms: i64) -> pb::DataplaneStatus {
    eventually("a shadow comparison", Duration::from_secs(20), || {
        status(cp, shadow).filter(|s| !s.applied_version.is_empty() && s.shadow_compared_unix_ms > since_ms)
    })
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64
}

/// iptables-save without counters and comments: what must not change under a shadow.
fn rules(ns: &NetNs) -> String {
    ns.run(&["iptables-save"]).lines().filter(|l| !l.starts_with('#')).collect::<Vec<_>>().join("\n")
}

fn scrape(addr: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn shadow_finds_no_difference_with_kube_proxy_or_kpx_and_lists_alterations() {
    if !netns::require_root_and_netns() {
        return;
    }
    let case = &conformance::cases()[3];
    let cp = controlplane(case);
    let work = tempfile::tempdir().unwrap();

    // (1) kube-proxy's own rules.
    let kube_proxy = NetNs::new("shadow");
    netns::feed(&mut kube_proxy.command(&["iptables-restore"]), &case.read("iptables-save.txt"));
    let before = rules(&kube_proxy);
    let shadow = start_shadow(case, &cp, &kube_proxy, work.path());
    let s = compared_after(&cp, &shadow, 0);
    assert_eq!(s.backend, "shadow");
    assert_eq!(s.shadow_differences, Vec::<String>::new(), "{}", s.shadow_error);
    assert!(s.shadow_error.is_empty(), "{}", s.shadow_error);
    let scraped = scrape(&shadow.metrics);
    assert!(scraped.contains("kpx_shadow_differences{kind=\"rule_only_in_kpx\"} 0"), "{scraped}");

    // (3) Hand-altered: an endpoint rule gone from a service chain, a stray rule in
    // KUBE-SERVICES, a chain kpx would not have.
    let svc_rule = case
        .read("iptables-save.txt")
        .lines()
        .find(|l| {
            l.starts_with("-A KUBE-SVC-")
                && l.contains("-j KUBE-SEP-")
                && !l.contains("-m statistic")
                && !l.contains("-m recent")
        })
        .unwrap()
        .to_string();
    let svc_chain = svc_rule.split_whitespace().nth(1).unwrap().to_string();
    let mut args: Vec<&str> = vec!["iptables", "-t", "nat", "-D"];
    let rest: Vec<String> = netns_tokens(&svc_rule[3..]);
    args.extend(rest.iter().map(String::as_str));
    kube_proxy.run(&args);
    kube_proxy.run(&[
        "iptables",
        "-t",
        "nat",
        "-A",
        "KUBE-SERVICES",
        "-d",
        "10.96.99.99/32",
        "-p",
        "tcp",
        "--dport",
        "99",
        "-j",
        "KUBE-MARK-MASQ",
    ]);
    kube_proxy.run(&["iptables", "-t", "nat", "-N", "KUBE-SVC-STRAYSTRAYSTRAY1"]);
    let altered = rules(&kube_proxy);
    let s = compared_after(&cp, &shadow, now_ms());
    let want = [
        format!(
            "+ nat -A {}   (only in kpx's rules)",
            svc_rule.strip_prefix(&format!("-A {svc_chain} ")).map(|r| format!("{svc_chain} {r}")).unwrap()
        ),
        "- nat -A KUBE-SERVICES -d 10.96.99.99/32 -p tcp -m tcp --dport 99 -j KUBE-MARK-MASQ   (only in the kernel)"
            .to_string(),
        "- nat KUBE-SVC-STRAYSTRAYSTRAY1   (chain only in the kernel)".to_string(),
    ];
    let mut got = s.shadow_differences.clone();
    got.sort();
    let mut want = want.to_vec();
    want.sort();
    assert_eq!(got, want);
    let scraped = scrape(&shadow.metrics);
    assert!(scraped.contains("kpx_shadow_differences{kind=\"rule_only_in_kernel\"} 1"), "{scraped}");
    assert!(scraped.contains("kpx_shadow_differences{kind=\"chain_only_in_kernel\"} 1"), "{scraped}");
    assert!(scraped.contains("kpx_shadow_differences{kind=\"rule_only_in_kpx\"} 1"), "{scraped}");
    let log = std::fs::read_to_string(&shadow.log).unwrap();
    assert!(
        log.contains("shadow: kpx's rules differ from the kernel's") && log.contains("KUBE-SVC-STRAYSTRAYSTRAY1"),
        "{log}"
    );
    // The shadow wrote nothing, before or after the alterations.
    assert_ne!(before, altered);
    assert_eq!(rules(&kube_proxy), altered, "the shadow changed the kernel's rules");
    drop(shadow);

    // (2) The rules kpx's iptables backend writes.
    let kpx = NetNs::new("shadow");
    let render = case.render_config();
    let mut cfg = IptablesConfig::new(render.family, &render.node_name);
    cfg.cluster_cidr = render.cluster_cidr.clone();
    cfg.netns = Some(kpx.name().to_string());
    let state = case.state();
    let all = ChangeSet { full: true, services: state.services().keys().cloned().collect() };
    IptablesBackend::new(cfg).apply(&state, &all).unwrap();
    let written = rules(&kpx);
    let shadow = start_shadow(case, &cp, &kpx, work.path());
    let s = compared_after(&cp, &shadow, 0);
    assert_eq!(s.shadow_differences, Vec::<String>::new());
    assert_eq!(rules(&kpx), written);
}

/// A saved rule's arguments as iptables takes them (quotes grouping, dropped).
fn netns_tokens(rule: &str) -> Vec<String> {
    kpx_dataplane::backend::iptables::ruleset::tokenize(rule).expect("a saved rule tokenizes")
}
