//! The real `kpx-dataplane --backend ipvs` inside user-mode Linux, fed by a real controlplane
//! serving deploy/examples: the node ACKs as an ipvs node, the example services appear as
//! virtual servers, the admin API's GetKernelRules lists them (and finds every virtual and real
//! server kpx wants), and a virtual server deleted by hand is back after the housekeeping
//! task's reconcile (`--sync-period 1s`), with nothing but the agent running.

mod ipvs;
#[path = "../../controlplane/tests/otlp/mod.rs"]
mod otlp;
mod uml;

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kpx_controlplane::cache::CacheConfig;
use kpx_controlplane::model::Skips;
use kpx_controlplane::server::SyncConfig;
use kpx_controlplane::source::files::FileSource;
use kpx_proto::v1 as pb;

fn wait(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}\n{}", ipvs::ipvsadm());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The agent's admin API (a fixed port: UML's network namespace is the test's own).
const ADMIN: &str = "127.0.0.1:10999";

/// The lines of the "ipvs" table from the first virtual server line starting with `words` up to
/// the next virtual server.
fn virtual_server<'a>(lines: &'a [String], words: &[&str]) -> Vec<&'a str> {
    let starts = |l: &str| l.split_whitespace().collect::<Vec<_>>().starts_with(words);
    let from = lines.iter().position(|l| starts(l)).unwrap_or(lines.len());
    let rest = lines.iter().skip(from + 1).take_while(|l| l.starts_with("  ->"));
    lines.get(from).into_iter().chain(rest).map(String::as_str).collect()
}

/// GetKernelRules shows the IPVS table with web's virtual server and its real servers, and every
/// virtual and real server kpx wants is in the kernel.
async fn check_kernel_rules() {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut admin = loop {
        if let Ok(c) = pb::admin_client::AdminClient::connect(format!("http://{ADMIN}")).await {
            break c;
        }
        assert!(Instant::now() < deadline, "the admin API never answered on {ADMIN}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let rules = admin.get_kernel_rules(pb::GetKernelRulesRequest {}).await.unwrap().into_inner();
    assert_eq!(rules.backend, "ipvs");
    assert!(rules.supported, "{}", rules.note);
    let table = rules.tables.iter().find(|t| t.name == "ipvs").expect("an ipvs table");
    let web = virtual_server(&table.lines, &["TCP", "10.96.0.10:80", "lc"]);
    assert!(web.len() >= 2, "web's virtual server with a real server in {:#?}", table.lines);
    let real: Vec<&str> = web[1].split_whitespace().collect();
    assert_eq!((real[0], real[2], real[3]), ("->", "Masq", "1"), "{web:#?}");
    let missing: Vec<String> =
        rules.chains.iter().filter(|c| !c.present).map(|c| format!("{} {}", c.service_port, c.chain)).collect();
    assert!(missing.is_empty(), "missing {missing:#?}\nin {:#?}", table.lines);
    let web_vs = rules.chains.iter().find(|c| c.chain == "TCP  10.96.0.10:80").expect("web's virtual server expected");
    assert_eq!((web_vs.service_port.as_str(), web_vs.family.as_str()), ("demo/web:http", "IPv4"));
    assert!(rules.chains.iter().any(|c| c.chain.starts_with("TCP  10.96.0.10:80 -> ")), "{:#?}", rules.chains);
}

/// Web's and echo-udp's virtual servers are there; web's, deleted by hand, comes back.
/// The agent's initial snapshot is one trace of its own (nothing caused it at the in-process
/// controlplane, which exports nothing): dp.apply, holding dp.ipvs.sync with the plan of the
/// whole table and its netlink operations.
fn check_apply_spans(receiver: &otlp::Receiver) {
    let find = |spans: &[serde_json::Value], name: &str, parent: Option<&serde_json::Value>| {
        spans.iter().find(|s| s["name"] == name && parent.is_none_or(|p| s["parent_span_id"] == p["span_id"])).cloned()
    };
    let tree = |spans: &[serde_json::Value]| {
        let apply = find(spans, "dp.apply", None)?;
        let sync = find(spans, "dp.ipvs.sync", Some(&apply))?;
        let plan = find(spans, "dp.ipvs.plan", Some(&sync))?;
        let netlink = find(spans, "dp.ipvs.netlink", Some(&sync))?;
        Some((apply, sync, plan, netlink))
    };
    let spans =
        receiver.wait_for(Duration::from_secs(30), "dp.apply > dp.ipvs.sync > plan, netlink", |s| tree(s).is_some());
    let (apply, sync, plan, netlink) = tree(&spans).unwrap();
    assert_eq!((otlp::attr(&apply, "node"), otlp::attr(&apply, "full")), (&"node-a".into(), &true.into()));
    assert_eq!(otlp::attr(&sync, "partial"), false, "a snapshot plans the whole table: {sync}");
    assert!(otlp::attr(&plan, "virtual_servers").as_i64().unwrap() >= 2, "{plan}");
    let ops = otlp::attr(&netlink, "ops").as_i64().unwrap();
    assert!(ops >= 2, "{netlink}");
    assert!(otlp::attr(&sync, "ops").as_i64().unwrap() >= ops, "{sync}");
    assert!(otlp::attr(&sync, "messages").as_i64().unwrap() >= ops, "{sync}");
}

fn repairs_drift() {
    let has =
        |words: &[&str]| ipvs::ipvsadm().lines().any(|l| l.split_whitespace().collect::<Vec<_>>().starts_with(words));
    wait("web's virtual server", || has(&["TCP", "10.96.0.10:80", "lc"]) && has(&["UDP", "10.96.0.20:53", "lc"]));
    let status = Command::new("ipvsadm").args(["-D", "-t", "10.96.0.10:80"]).status().unwrap();
    // Not asserted gone: the agent's reconcile may already have put it back.
    assert!(status.success());
    wait("the deleted virtual server to come back", || has(&["TCP", "10.96.0.10:80", "lc"]));
    let out = Command::new("ip").args(["-o", "addr", "show", "dev", "kube-ipvs0"]).output().unwrap();
    let addrs = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(addrs.contains("10.96.0.10/32") && addrs.contains("10.96.0.20/32"), "{addrs}");
}

async fn scenario() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let cp_addr = listener.local_addr().unwrap();
    let skips = Arc::new(Skips::default());
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples");
    let source = Box::new(FileSource::new(examples, skips.clone()));
    let (_stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let tmp = tempfile::tempdir().unwrap();
    let receiver = std::env::var_os("KPX_TEST_PYTHON").map(|_| otlp::Receiver::start(tmp.path()));
    tokio::spawn(kpx_controlplane::serve(
        listener,
        source,
        skips,
        CacheConfig::default(),
        SyncConfig::default(),
        async {
            let _ = stopped.await;
        },
    ));
    let mut dp = Command::new(env!("CARGO_BIN_EXE_kpx-dataplane"))
        .args(["--node", "node-a", "--controlplane", &format!("http://{cp_addr}"), "--backend", "ipvs"])
        .args(["--ipvs-scheduler", "lc", "--cluster-cidr", "10.244.0.0/16", "--sync-period", "1s"])
        .args(["--healthz-bind-address", "127.0.0.1:0", "--metrics-bind-address", "127.0.0.1:0"])
        .args(["--admin-listen", ADMIN])
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .envs(receiver.iter().flat_map(|r| r.env()))
        .stdin(Stdio::null())
        .spawn()
        .expect("start kpx-dataplane");

    let url = format!("http://{cp_addr}");
    let deadline = Instant::now() + Duration::from_secs(30);
    let node = loop {
        if let Ok(mut c) = pb::inspect_client::InspectClient::connect(url.clone()).await {
            let nodes = c.list_nodes(pb::ListNodesRequest {}).await.unwrap().into_inner().nodes;
            if let Some(n) = nodes.into_iter().find(|n| n.name == "node-a" && !n.acked_version.is_empty()) {
                break n;
            }
        }
        assert!(Instant::now() < deadline, "node-a never acked");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(node.backend, "ipvs");
    assert!(node.last_nack_error.is_empty(), "{}", node.last_nack_error);
    // In a task, so that a failed check still stops the agent below.
    let checked = tokio::spawn(check_kernel_rules()).await;
    let result = match checked {
        Ok(()) => tokio::task::spawn_blocking(repairs_drift).await,
        Err(e) => Err(e),
    };
    let result = match (result, receiver) {
        (Ok(()), Some(r)) => tokio::task::spawn_blocking(move || check_apply_spans(&r)).await,
        (result, _) => result,
    };
    let _ = dp.kill();
    let _ = dp.wait();
    if let Err(e) = result {
        std::panic::resume_unwind(e.into_panic());
    }
}

#[test]
fn the_agent_programs_ipvs_from_the_controlplane_and_repairs_drift() {
    // The OTLP receiver runs inside UML, with the python found here (where CI=true makes a
    // missing one fail; inside, the environment is minimal).
    let python = otlp::interpreter();
    let env: Vec<(&str, &str)> = python.iter().map(|p| ("KPX_TEST_PYTHON", p.as_str())).collect();
    ipvs::in_uml_with("the_agent_programs_ipvs_from_the_controlplane_and_repairs_drift", &env, || {
        tokio::runtime::Runtime::new().unwrap().block_on(scenario());
    });
}
