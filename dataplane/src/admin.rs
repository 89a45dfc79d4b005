//! The admin gRPC API (`kpx.v1.Admin`, `--admin-listen`): the version and state this node has
//! applied, its sync status and counters, the drift the last canary/reconcile check found, and
//! what is really in the kernel for kpx's chains or virtual servers. Served with gRPC health and
//! server reflection (v1 and v1alpha) so that grpcurl works without .proto files.
//!
//! The handlers only read what the agent keeps anyway: [`AdminStatus`] (fed from the session's
//! events and the housekeeping checks) and a [`CoreView`] taken under the agent's core mutex
//! (on a blocking thread, as an apply may hold that mutex for a while). `iptables-save` and the
//! IPVS netlink dump run on a blocking thread too; the dump uses its own socket, so that it
//! never waits for the backend's.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use kpx_auth::{Access, Caller, ServerSecurity, Verb};
use kpx_proto::v1 as pb;
use kpx_proto::v1::admin_server::{Admin, AdminServer};
use tonic::{Request, Response, Status};

use crate::backend::iptables::chains::PortChains;
use crate::backend::iptables::exec::Runner;
use crate::backend::iptables::render::IpFamily;
use crate::backend::iptables::{BackendStats, IptablesConfig, jumps};
use crate::backend::ipvs::{IpvsConfig, dump, plan};
use crate::backend::nftables::{NftConfig, NftStats};
use crate::backend::shadow::ShadowResult;
use crate::state::{AppliedState, Services};
use crate::stream::SyncEvent;

/// What the admin API needs from the agent's core, copied out under its lock.
#[derive(Debug, Clone, Default)]
pub struct CoreView {
    /// The applied services, by "namespace/name".
    pub services: Services,
    /// One iptables backend per family, with its stats.
    pub iptables: Vec<(IptablesConfig, BackendStats)>,
    /// The IPVS backend's configuration (node addresses resolved) when it drives this node: what
    /// its desired virtual servers are computed with.
    pub ipvs: Option<IpvsConfig>,
    /// `--backend shadow`: the last comparison with the kernel's rules.
    pub shadow: Option<ShadowResult>,
    /// The userspace backend: its namespace (tests) and per-family rule stats.
    pub userspace: Option<UserspaceView>,
    /// One nftables backend per family, with its stats.
    pub nftables: Vec<(NftConfig, NftStats)>,
}

/// What the admin API shows of the userspace backend.
#[derive(Debug, Clone, Default)]
pub struct UserspaceView {
    pub netns: Option<String>,
    pub stats: Vec<(IpFamily, BackendStats)>,
}

/// Produces a [`CoreView`]; blocking (it takes the agent's core mutex).
pub type ViewFn = Arc<dyn Fn() -> CoreView + Send + Sync>;

#[derive(Debug, Default, Clone)]
struct StatusInner {
    connected: bool,
    applied_version: String,
    last_error: String,
    last_check_unix_ms: i64,
    drift: String,
}

/// The session's and the housekeeping's part of `GetStatus`.
#[derive(Debug, Default)]
pub struct AdminStatus {
    inner: Mutex<StatusInner>,
}

fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

impl AdminStatus {
    fn lock(&self) -> std::sync::MutexGuard<'_, StatusInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records one session event.
    pub fn event(&self, e: &SyncEvent) {
        let mut s = self.lock();
        match e {
            SyncEvent::Connected => {
                s.connected = true;
                s.last_error.clear();
            }
            SyncEvent::Disconnected { error } => {
                s.connected = false;
                s.last_error = error.clone();
            }
            SyncEvent::Applied { version, .. } => {
                s.applied_version = version.clone();
                s.last_error.clear();
            }
            SyncEvent::Rejected { version, error, .. } => {
                s.last_error = format!("version {version} rejected: {error}");
            }
        }
    }

    /// Records a canary/reconcile check: the drift it found, empty when none.
    pub fn checked(&self, drift: String) {
        let mut s = self.lock();
        s.last_check_unix_ms = unix_ms(SystemTime::now());
        s.drift = drift;
    }
}

fn family_name(f: IpFamily) -> &'static str {
    match f {
        IpFamily::V4 => "IPv4",
        IpFamily::V6 => "IPv6",
    }
}

fn proto_name(p: pb::Protocol) -> Option<&'static str> {
    match p {
        pb::Protocol::Tcp => Some("tcp"),
        pb::Protocol::Udp => Some("udp"),
        pb::Protocol::Sctp => Some("sctp"),
        pb::Protocol::Unspecified => None,
    }
}

/// The per-service-port chains the iptables backend of `family` programs for these services
/// (pure): KUBE-SVC when cluster traffic has endpoints, KUBE-SVL when node-local traffic does,
/// following the render's rules. Ports without usable endpoints have no chain (their traffic is
/// rejected from KUBE-SERVICES). Returns (service port name, chain).
pub fn expected_chains(services: &Services, family: IpFamily) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (key, entry) in services {
        let s = &entry.service;
        for port in &s.ports {
            let Some(proto) = proto_name(port.protocol()) else { continue };
            let name = if port.name.is_empty() { key.clone() } else { format!("{key}:{}", port.name) };
            let eps = entry.endpoints.values().filter(|e| {
                let v4 = e.ip.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_ipv4());
                v4 == (family == IpFamily::V4) && e.ports.iter().any(|p| p.name == port.name && p.port != 0)
            });
            let (mut cluster, mut local) = (false, false);
            for e in eps {
                cluster |= e.for_cluster;
                local |= e.for_local;
            }
            let has_ext = port.node_port != 0 || !s.external_ips.is_empty() || !s.load_balancer_ips.is_empty();
            let (itp, etp) = (s.internal_policy_local, s.external_policy_local);
            let ch = PortChains::new(&name, proto);
            if cluster && (!itp || has_ext) {
                out.push((name.clone(), ch.svc));
            }
            if local && (itp || (etp && has_ext)) {
                out.push((name, ch.svl));
            }
        }
    }
    out
}

/// The lines of `iptables-save -t TABLE` output that belong to KUBE-* chains (pure).
pub fn kube_lines(save: &str) -> Vec<String> {
    save.lines()
        .filter(|l| {
            let rest = l.strip_prefix(':').or_else(|| l.strip_prefix("-A "));
            rest.is_some_and(|r| r.starts_with("KUBE-"))
        })
        .map(str::to_string)
        .collect()
}

/// The status message (pure).
pub fn status_message(node: &str, backend: &str, s: &AdminStatusSnapshot, view: &CoreView) -> pb::DataplaneStatus {
    let nftables: Vec<_> = view.nftables.iter().map(|(cfg, st)| (cfg.family, st.as_backend_stats())).collect();
    let backends = view
        .iptables
        .iter()
        .map(|(cfg, st)| {
            backend_status(
                format!("{} {}", if cfg.dry_run { "dry-run" } else { "iptables" }, family_name(cfg.family)),
                st,
            )
        })
        .chain(view.ipvs.as_ref().map(|_| pb::BackendStatus { name: "ipvs".into(), ..Default::default() }))
        .chain(
            view.userspace
                .iter()
                .flat_map(|u| &u.stats)
                .map(|(family, st)| backend_status(format!("userspace {}", family_name(*family)), st)),
        )
        .chain(nftables.iter().map(|(family, st)| backend_status(format!("nftables {}", family_name(*family)), st)))
        .collect();
    pb::DataplaneStatus {
        node_name: node.to_string(),
        backend: backend.to_string(),
        applied_version: s.0.applied_version.clone(),
        connected: s.0.connected,
        last_error: s.0.last_error.clone(),
        backends,
        last_check_unix_ms: s.0.last_check_unix_ms,
        drift: s.0.drift.clone(),
        services: view.services.len() as u64,
        endpoints: view.services.values().map(|e| e.endpoints.len() as u64).sum(),
        shadow_compared_unix_ms: view.shadow.as_ref().map_or(0, |r| r.compared_unix_ms),
        shadow_differences: view.shadow.as_ref().map(|r| r.differences.clone()).unwrap_or_default(),
        shadow_error: view.shadow.as_ref().and_then(|r| r.error.clone()).unwrap_or_default(),
    }
}

/// One backend's line of `GetStatus` from the figures every backend reports.
fn backend_status(name: String, st: &BackendStats) -> pb::BackendStatus {
    pb::BackendStatus {
        name,
        last_sync_full: st.last_sync_full,
        last_sync_micros: st.last_sync_duration.map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX)),
        last_success_unix_ms: st.last_success.map_or(0, unix_ms),
        last_full_reason: st.last_full_reason.map(|r| format!("{r:?}")).unwrap_or_default(),
        last_error: st.last_error.clone().unwrap_or_default(),
        full_syncs: st.full_syncs,
        partial_syncs: st.partial_syncs,
        restore_failures: st.restore_failures,
        rules_filter: st.rules.filter as u64,
        rules_nat: st.rules.nat as u64,
    }
}

/// A copy of [`AdminStatus`] at one moment.
#[derive(Debug, Clone, Default)]
pub struct AdminStatusSnapshot(StatusInner);

/// The applied services as a NodeState, with the content version they hash to (pure).
pub fn applied_state(node: &str, services: &Services) -> pb::NodeState {
    let version = crate::state::content_hash(services).to_version();
    let services = services
        .values()
        .map(|e| pb::ServiceState {
            service: Some(e.service.clone()),
            endpoints: e.endpoints.values().cloned().collect(),
        })
        .collect();
    pb::NodeState { node_name: node.to_string(), version, services }
}

fn ipvs_family_name(f: kpx_ipvs_netlink::Family) -> &'static str {
    match f {
        kpx_ipvs_netlink::Family::Inet => "IPv4",
        kpx_ipvs_netlink::Family::Inet6 => "IPv6",
    }
}

/// The IPVS part of `GetKernelRules` (pure): the dumped table as one "ipvs" table, and every
/// virtual server and real server the backend wants for `services`, with whether the dump has it.
pub fn ipvs_kernel_rules(out: &mut pb::KernelRules, cfg: &IpvsConfig, services: &Services, kernel: dump::Dump) {
    out.supported = true;
    out.tables.push(pb::KernelTable { name: "ipvs".into(), lines: dump::lines(&kernel) });
    let desired = plan::desired(&cfg.plan_config(), &AppliedState::from_services(services));
    let expected = dump::expected(&desired, &dump::PortNames::new(services), &plan::table_from(kernel));
    out.chains = expected
        .into_iter()
        .map(|e| pb::ExpectedChain {
            service_port: e.service_port,
            chain: e.entry,
            present: e.present,
            family: ipvs_family_name(e.family).into(),
        })
        .collect();
}

/// Reads the IPVS table through a netlink socket of its own (blocking).
fn read_ipvs() -> Result<dump::Dump, kpx_ipvs_netlink::IpvsError> {
    let mut client = kpx_ipvs_netlink::IpvsClient::new()?;
    dump::read(&mut client)
}

/// Reads the kernel (blocking: runs iptables-save or dumps the IPVS table).
fn kernel_rules(backend: &str, view: &CoreView) -> pb::KernelRules {
    let mut out = pb::KernelRules { backend: backend.to_string(), ..Default::default() };
    if let Some(cfg) = &view.ipvs {
        match read_ipvs() {
            Ok(kernel) => ipvs_kernel_rules(&mut out, cfg, &view.services, kernel),
            Err(e) => out.note = format!("reading the IPVS table: {e}"),
        }
        return out;
    }
    if view.shadow.is_some() {
        out.note =
            "shadow: kpx programs nothing; GetStatus.shadow_differences compares its rules with the kernel's".into();
        return out;
    }
    if let Some(u) = &view.userspace {
        userspace_kernel_rules(&mut out, u);
        return out;
    }
    if !view.nftables.is_empty() {
        nft_kernel_rules(&mut out, view);
        return out;
    }
    if view.iptables.iter().all(|(cfg, _)| cfg.dry_run) {
        out.note = "dry-run: nothing is programmed into the kernel".into();
        return out;
    }
    out.supported = true;
    let mut errors = Vec::new();
    for (cfg, _) in view.iptables.iter().filter(|(cfg, _)| !cfg.dry_run) {
        let family = family_name(cfg.family);
        let runner = Runner { netns: cfg.netns.clone() };
        let mut chains = std::collections::BTreeSet::new();
        for table in jumps::TABLES {
            match runner.run_ok(&[&cfg.save_cmd, "-t", table], &[]) {
                Ok(ran) => {
                    let lines = kube_lines(&ran.stdout);
                    chains.extend(
                        lines.iter().filter_map(|l| l.strip_prefix(':')?.split_whitespace().next()).map(String::from),
                    );
                    out.tables.push(pb::KernelTable { name: format!("iptables {family} {table}"), lines });
                }
                Err(e) => errors.push(e.to_string()),
            }
        }
        out.chains.extend(expected_chains(&view.services, cfg.family).into_iter().map(|(port, chain)| {
            pb::ExpectedChain { present: chains.contains(&chain), service_port: port, chain, family: family.into() }
        }));
    }
    out.note = errors.join("; ");
    out
}

/// The userspace backend's part of `GetKernelRules`: its chains (KUBE-PORTALS-*,
/// KUBE-NODEPORT-*) per family and table. It has no per-service chains to expect.
fn userspace_kernel_rules(out: &mut pb::KernelRules, u: &UserspaceView) {
    out.supported = true;
    let runner = Runner { netns: u.netns.clone() };
    let mut errors = Vec::new();
    for (family, _) in &u.stats {
        let save = if *family == IpFamily::V4 { "iptables-save" } else { "ip6tables-save" };
        for table in jumps::TABLES {
            match runner.run_ok(&[save, "-t", table], &[]) {
                Ok(ran) => out.tables.push(pb::KernelTable {
                    name: format!("userspace {} {table}", family_name(*family)),
                    lines: kube_lines(&ran.stdout),
                }),
                Err(e) => errors.push(e.to_string()),
            }
        }
    }
    out.note = errors.join("; ");
}

/// The nftables part of `GetKernelRules`: each family's table dumped through a socket of its
/// own, listed in nft syntax, and the service-/local- chains kpx wants with their presence.
fn nft_kernel_rules(out: &mut pb::KernelRules, view: &CoreView) {
    use crate::backend::nftables::{desired::desired_objects, endpoints::Slots, layout, view as nview};
    out.supported = true;
    let state = AppliedState::from_services(&view.services);
    let mut errors = Vec::new();
    for (cfg, _) in &view.nftables {
        let family = family_name(cfg.family);
        let dump = cfg.client().and_then(|mut c| c.dump_table(cfg.nfproto(), layout::TABLE));
        let dump = match dump {
            Ok(d) => d,
            Err(e) => {
                errors.push(format!("{family}: {e}"));
                continue;
            }
        };
        // The endpoint map ranges the table has, as the agent's next full sync reads them.
        let mut slots = dump.as_ref().map(Slots::from_dump).unwrap_or_default();
        let desired = desired_objects(&cfg.render_config(), &state, &mut slots).0;
        if let Some(d) = &dump {
            let name = format!("nftables {} {}", layout::family_word(cfg.family), layout::TABLE);
            out.tables.push(pb::KernelTable { name, lines: nview::kernel_lines(cfg.family, &desired, d) });
        }
        out.chains.extend(nview::expected_chains(&desired, dump.as_ref()).into_iter().map(|(port, chain, present)| {
            pb::ExpectedChain { service_port: port, chain, present, family: family.into() }
        }));
    }
    out.note = errors.join("; ");
}

/// The `kpx.v1.Admin` service.
#[derive(Clone)]
pub struct AdminService {
    node: String,
    backend: String,
    status: Arc<AdminStatus>,
    view: ViewFn,
}

impl AdminService {
    pub fn new(node: &str, backend: &str, status: Arc<AdminStatus>, view: ViewFn) -> Self {
        AdminService { node: node.to_string(), backend: backend.to_string(), status, view }
    }

    async fn view(&self) -> Result<CoreView, Status> {
        let view = self.view.clone();
        tokio::task::spawn_blocking(move || view()).await.map_err(|e| Status::internal(e.to_string()))
    }

    /// Who may read this node's admin API: the node's own credentials, admins, and users RBAC
    /// lets `get` this node's `nodestates.kpx.io`.
    async fn authorize<T>(&self, request: &Request<T>) -> Result<(), Status> {
        Caller::of(request).authorize(Access::NodeState { node: &self.node, verb: Verb::Get }).await
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn get_status(
        &self,
        request: Request<pb::GetStatusRequest>,
    ) -> Result<Response<pb::DataplaneStatus>, Status> {
        self.authorize(&request).await?;
        let view = self.view().await?;
        let snap = AdminStatusSnapshot(self.status.lock().clone());
        Ok(Response::new(status_message(&self.node, &self.backend, &snap, &view)))
    }

    async fn get_applied_state(
        &self,
        request: Request<pb::GetAppliedStateRequest>,
    ) -> Result<Response<pb::NodeState>, Status> {
        self.authorize(&request).await?;
        let view = self.view().await?;
        Ok(Response::new(applied_state(&self.node, &view.services)))
    }

    async fn get_kernel_rules(
        &self,
        request: Request<pb::GetKernelRulesRequest>,
    ) -> Result<Response<pb::KernelRules>, Status> {
        self.authorize(&request).await?;
        let view = self.view.clone();
        let backend = self.backend.clone();
        let rules = tokio::task::spawn_blocking(move || kernel_rules(&backend, &view()))
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(rules))
    }
}

/// Serves the admin API, health and reflection on `listener` until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener, security: ServerSecurity, service: AdminService) {
    let addr: Option<SocketAddr> = listener.local_addr().ok();
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter.set_serving::<AdminServer<AdminService>>().await;
    let (reflection_v1, reflection_v1alpha) = kpx_proto::reflection::services(&["kpx.v1.Admin"]);
    tracing::info!(addr = ?addr, tls = security.is_tls(), "serving kpx.v1.Admin");
    let result = kpx_auth::server_builder()
        .layer(security.layer())
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(AdminServer::new(service).max_decoding_message_size(kpx_auth::server::MAX_REQUEST_BYTES))
        .serve_with_incoming(security.incoming(listener))
        .await;
    if let Err(error) = result {
        tracing::error!(%error, "admin gRPC server failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::ServiceEntry;
    use std::collections::BTreeMap;

    fn entry(key: &str, port_name: &str, eps: &[(&str, bool, bool)]) -> Arc<ServiceEntry> {
        let (ns, name) = key.split_once('/').unwrap();
        Arc::new(ServiceEntry {
            service: pb::Service {
                namespace: ns.into(),
                name: name.into(),
                cluster_ips: vec!["10.96.0.10".into()],
                ports: vec![pb::ServicePort {
                    name: port_name.into(),
                    protocol: pb::Protocol::Tcp as i32,
                    port: 80,
                    node_port: 0,
                }],
                ..Default::default()
            },
            endpoints: eps
                .iter()
                .map(|(ip, cluster, local)| {
                    let ep = pb::Endpoint {
                        service: key.into(),
                        ip: ip.to_string(),
                        ports: vec![pb::EndpointPort { name: port_name.into(), port: 8080 }],
                        for_cluster: *cluster,
                        for_local: *local,
                        node_tag: 0,
                    };
                    (ip.to_string(), ep)
                })
                .collect(),
        })
    }

    #[test]
    fn expected_chains_follow_endpoints_and_family() {
        let mut services = BTreeMap::new();
        services.insert("default/hostnames".into(), entry("default/hostnames", "", &[("10.244.1.9", true, false)]));
        services.insert("demo/empty".into(), entry("demo/empty", "http", &[]));
        services.insert("demo/v6".into(), entry("demo/v6", "http", &[("fd00::9", true, false)]));
        let v4 = expected_chains(&services, IpFamily::V4);
        // An unnamed port's chain is named after the service alone, as the render does.
        let svc = PortChains::new("default/hostnames", "tcp").svc;
        assert_eq!(v4, [("default/hostnames".to_string(), svc)]);
        let v6 = expected_chains(&services, IpFamily::V6);
        assert_eq!(v6.len(), 1);
        assert_eq!(v6[0].0, "demo/v6:http");
        assert!(v6[0].1.starts_with("KUBE-SVC-"));
    }

    #[test]
    fn expected_chains_are_the_ones_the_render_declares() {
        let mut local = entry("demo/web-local", "http", &[("10.244.1.9", true, true)]);
        let svc = &mut Arc::make_mut(&mut local).service;
        svc.external_policy_local = true;
        svc.ports[0].node_port = 30080;
        let services = BTreeMap::from([
            ("default/hostnames".to_string(), entry("default/hostnames", "", &[("10.244.1.9", true, false)])),
            ("demo/web-local".to_string(), local),
            ("demo/empty".to_string(), entry("demo/empty", "http", &[])),
        ]);
        let st = applied_state("node-a", &services);
        let u = pb::Update {
            full: true,
            version: st.version.clone(),
            services_upserted: st.services.iter().map(|s| s.service.clone().unwrap()).collect(),
            endpoints_upserted: st.services.iter().flat_map(|s| s.endpoints.clone()).collect(),
            ..Default::default()
        };
        let mut state = crate::state::AppliedState::default();
        let changes = state.apply(&u).unwrap();
        let cfg = IptablesConfig { dry_run: true, ..IptablesConfig::new(IpFamily::V4, "node-a") };
        let mut backend = crate::backend::iptables::IptablesBackend::new(cfg);
        crate::stream::Apply::apply(&mut backend, &state, &changes).unwrap();
        let restore = backend.last_restore_input();
        let declared = crate::backend::iptables::saved::declared_chains(&restore, "nat");
        let expected = expected_chains(&services, IpFamily::V4);
        assert_eq!(expected.len(), 3, "{expected:?}");
        for (port, chain) in &expected {
            assert!(declared.contains(chain.as_str()), "{port}: {chain} not declared in\n{restore}");
        }
    }

    #[test]
    fn local_internal_policy_uses_svl() {
        let mut e = entry("demo/web", "", &[("10.244.1.9", true, true)]);
        Arc::make_mut(&mut e).service.internal_policy_local = true;
        let services = BTreeMap::from([("demo/web".to_string(), e)]);
        let chains = expected_chains(&services, IpFamily::V4);
        assert_eq!(chains.len(), 1);
        assert!(chains[0].1.starts_with("KUBE-SVL-"), "{chains:?}");
    }

    #[test]
    fn kube_lines_keep_only_kube_chains() {
        let save = "# Generated by iptables-save\n*nat\n:PREROUTING ACCEPT [0:0]\n:KUBE-SERVICES - [0:0]\n\
                    :KUBE-SVC-ABC - [0:0]\n-A PREROUTING -j KUBE-SERVICES\n-A KUBE-SERVICES -d 10.96.0.10/32 -j KUBE-SVC-ABC\n\
                    -A DOCKER -j RETURN\nCOMMIT\n";
        assert_eq!(
            kube_lines(save),
            [":KUBE-SERVICES - [0:0]", ":KUBE-SVC-ABC - [0:0]", "-A KUBE-SERVICES -d 10.96.0.10/32 -j KUBE-SVC-ABC"]
        );
    }

    #[test]
    fn applied_state_hashes_like_the_controlplane() {
        let services = BTreeMap::from([(
            "demo/web".to_string(),
            entry("demo/web", "", &[("10.244.1.9", true, false), ("10.244.2.9", true, false)]),
        )]);
        let st = applied_state("node-a", &services);
        let mut state = crate::state::AppliedState::default();
        let u = pb::Update {
            full: true,
            version: st.version.clone(),
            services_upserted: vec![st.services[0].service.clone().unwrap()],
            endpoints_upserted: st.services[0].endpoints.clone(),
            ..Default::default()
        };
        state.apply(&u).expect("the version matches the content");
        assert_eq!(st.node_name, "node-a");
        assert_eq!(st.services[0].endpoints.len(), 2);
    }

    #[test]
    fn a_state_from_services_has_the_version_they_hash_to() {
        let services = BTreeMap::from([(
            "demo/web".to_string(),
            entry("demo/web", "http", &[("10.244.1.9", true, false), ("10.244.2.9", true, false)]),
        )]);
        let st = AppliedState::from_services(&services);
        assert_eq!(st.version().map(|v| v.to_version()), Some(applied_state("node-a", &services).version));
        assert_eq!(st.endpoint_count(), 2);
    }

    fn ipvs_dump(dests: &[&str]) -> dump::Dump {
        use kpx_ipvs_netlink::{Destination, DestinationInfo, Protocol, Service, ServiceInfo};
        let service = Service::new(Protocol::Tcp, "10.96.0.10:80".parse().unwrap(), "lc");
        let dests = dests
            .iter()
            .map(|d| DestinationInfo {
                dest: Destination::new(d.parse().unwrap(), 1),
                active_conns: 0,
                inactive_conns: 0,
                persist_conns: 0,
                stats: Default::default(),
            })
            .collect();
        vec![(ServiceInfo { service, stats: Default::default() }, dests)]
    }

    #[test]
    fn ipvs_kernel_rules_list_the_table_and_check_the_desired_servers() {
        let services = BTreeMap::from([(
            "demo/web".to_string(),
            entry("demo/web", "http", &[("10.244.1.9", true, false), ("10.244.2.9", true, false)]),
        )]);
        let cfg = IpvsConfig { scheduler: "lc".into(), ..IpvsConfig::new("node-a") };
        let mut out = pb::KernelRules::default();
        ipvs_kernel_rules(&mut out, &cfg, &services, ipvs_dump(&["10.244.1.9:8080"]));
        assert!(out.supported);
        assert_eq!(out.tables[0].name, "ipvs");
        assert_eq!(out.tables[0].lines, ["TCP  10.96.0.10:80 lc", "  -> 10.244.1.9:8080  Masq  1  0  0"]);
        let chains: Vec<(&str, &str, bool, &str)> = out
            .chains
            .iter()
            .map(|c| (c.service_port.as_str(), c.chain.as_str(), c.present, c.family.as_str()))
            .collect();
        assert_eq!(
            chains,
            [
                ("demo/web:http", "TCP  10.96.0.10:80", true, "IPv4"),
                ("demo/web:http", "TCP  10.96.0.10:80 -> 10.244.1.9:8080", true, "IPv4"),
                ("demo/web:http", "TCP  10.96.0.10:80 -> 10.244.2.9:8080", false, "IPv4"),
            ]
        );
    }

    #[test]
    fn status_tracks_events_and_checks() {
        let s = AdminStatus::default();
        s.event(&SyncEvent::Connected);
        s.event(&SyncEvent::Rejected {
            nonce: 1,
            version: "v1".into(),
            error: "boom".into(),
            changes: Default::default(),
        });
        assert!(s.lock().last_error.contains("boom"));
        s.event(&SyncEvent::Applied {
            nonce: 2,
            version: "v2".into(),
            full: true,
            entries: 0,
            changes: Default::default(),
            wire_bytes: 0,
            chunks: 1,
            apply: std::time::Duration::ZERO,
            change_times_unix_ms: vec![],
            programmed_at: SystemTime::now(),
        });
        s.checked("IPv4: canary gone".into());
        let cfg = IptablesConfig { dry_run: true, ..IptablesConfig::new(IpFamily::V4, "node-a") };
        let view = CoreView { iptables: vec![(cfg, BackendStats::default())], ..Default::default() };
        let msg = status_message("node-a", "dry-run", &AdminStatusSnapshot(s.lock().clone()), &view);
        assert!(msg.connected);
        assert_eq!(msg.applied_version, "v2");
        assert_eq!(msg.last_error, "");
        assert_eq!(msg.drift, "IPv4: canary gone");
        assert!(msg.last_check_unix_ms > 0);
        assert_eq!(msg.backends[0].name, "dry-run IPv4");
        let rules = kernel_rules("dry-run", &view);
        assert!(!rules.supported);
        assert!(rules.note.contains("dry-run"));
    }
}
