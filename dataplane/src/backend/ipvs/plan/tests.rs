//! Address conventions: ClusterIPs 10.96.0.0/16 and fd00:96::/64, endpoints 10.244.0.0/16,
//! node 192.168.0.10, NodePorts 30000+.

use super::*;

const NODE: &str = "192.168.0.10";

fn cfg() -> PlanConfig {
    PlanConfig {
        scheduler: "rr".into(),
        node_ips: vec![NODE.parse().unwrap()],
        families: vec![Family::Inet, Family::Inet6],
        node_tag: kpx_proto::node_tag("node-1"),
    }
}

fn svc(name: &str, ip: &str, proto: pb::Protocol, port: u32, node_port: u32) -> pb::Service {
    pb::Service {
        namespace: "ns".into(),
        name: name.into(),
        cluster_ips: vec![ip.into()],
        ports: vec![pb::ServicePort { name: "p".into(), protocol: proto as i32, port, node_port }],
        ..Default::default()
    }
}

fn ep(service: &str, ip: &str) -> pb::Endpoint {
    pb::Endpoint {
        service: format!("ns/{service}"),
        ip: ip.into(),
        ports: vec![pb::EndpointPort { name: "p".into(), port: 8080 }],
        for_cluster: true,
        for_local: false,
        node_tag: 0,
    }
}

fn state(services: Vec<pb::Service>, endpoints: Vec<pb::Endpoint>) -> AppliedState {
    AppliedState::with(services, endpoints).expect("test state applies")
}

/// The kernel after every op of a plan succeeded.
fn applied(ops: &[Op], mut table: Table) -> Table {
    ops.iter().for_each(|op| record(&mut table, op));
    table
}

fn owns_all(_: &Key) -> bool {
    true
}

fn web(eps: &[&str]) -> AppliedState {
    state(vec![svc("web", "10.96.0.10", pb::Protocol::Tcp, 80, 0)], eps.iter().map(|ip| ep("web", ip)).collect())
}

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

#[test]
fn a_new_service_is_one_add_plus_one_per_real_server() {
    let d = desired(&cfg(), &web(&["10.244.0.11", "10.244.0.12"]));
    let ops = plan(&d, &Table::new(), owns_all);
    let svc = Service::new(Protocol::Tcp, sa("10.96.0.10:80"), "rr");
    assert_eq!(
        ops,
        vec![
            Op::AddService(svc.clone()),
            Op::AddDest(svc.clone(), Destination::new(sa("10.244.0.11:8080"), 1)),
            Op::AddDest(svc, Destination::new(sa("10.244.0.12:8080"), 1)),
        ]
    );
    assert_eq!(d.vips, BTreeSet::from(["10.96.0.10".parse().unwrap()]));
}

#[test]
fn adding_one_endpoint_is_exactly_one_add_destination() {
    let table = applied(&plan(&desired(&cfg(), &web(&["10.244.0.11"])), &Table::new(), owns_all), Table::new());
    let ops = plan(&desired(&cfg(), &web(&["10.244.0.11", "10.244.0.12"])), &table, owns_all);
    let svc = Service::new(Protocol::Tcp, sa("10.96.0.10:80"), "rr");
    assert_eq!(ops, vec![Op::AddDest(svc, Destination::new(sa("10.244.0.12:8080"), 1))]);
}

#[test]
fn a_removed_tcp_endpoint_drains_then_is_deleted() {
    let two = desired(&cfg(), &web(&["10.244.0.11", "10.244.0.12"]));
    let mut table = applied(&plan(&two, &Table::new(), owns_all), Table::new());
    let key = Key { protocol: Protocol::Tcp, addr: sa("10.96.0.10:80") };
    table.get_mut(&key).unwrap().dests.get_mut(&sa("10.244.0.12:8080")).unwrap().active_conns = 1;

    let one = desired(&cfg(), &web(&["10.244.0.11"]));
    let ops = plan(&one, &table, owns_all);
    let svc = Service::new(Protocol::Tcp, sa("10.96.0.10:80"), "rr");
    assert_eq!(ops, vec![Op::UpdateDest(svc.clone(), Destination::new(sa("10.244.0.12:8080"), 0))]);
    let mut table = applied(&ops, table);
    assert_eq!(draining(&one, &table), vec![key]);

    // Still a connection: nothing to do.
    assert_eq!(plan(&one, &table, owns_all), vec![]);
    // Drained: deleted.
    table.get_mut(&key).unwrap().dests.get_mut(&sa("10.244.0.12:8080")).unwrap().active_conns = 0;
    let ops = plan(&one, &table, owns_all);
    assert_eq!(ops, vec![Op::DeleteDest(svc, Destination::new(sa("10.244.0.12:8080"), 0))]);
    let table = applied(&ops, table);
    assert_eq!(draining(&one, &table), vec![]);
}

#[test]
fn a_draining_endpoint_that_comes_back_gets_its_weight_back() {
    let two = desired(&cfg(), &web(&["10.244.0.11", "10.244.0.12"]));
    let table = applied(&plan(&two, &Table::new(), owns_all), Table::new());
    let one = desired(&cfg(), &web(&["10.244.0.11"]));
    let table = applied(&plan(&one, &table, owns_all), table);
    let svc = Service::new(Protocol::Tcp, sa("10.96.0.10:80"), "rr");
    assert_eq!(plan(&two, &table, owns_all), vec![Op::UpdateDest(svc, Destination::new(sa("10.244.0.12:8080"), 1))]);
}

#[test]
fn a_removed_udp_endpoint_is_deleted_at_once() {
    let dns = |eps: &[&str]| {
        state(vec![svc("dns", "10.96.0.53", pb::Protocol::Udp, 53, 0)], eps.iter().map(|ip| ep("dns", ip)).collect())
    };
    let table =
        applied(&plan(&desired(&cfg(), &dns(&["10.244.0.11", "10.244.0.12"])), &Table::new(), owns_all), Table::new());
    let ops = plan(&desired(&cfg(), &dns(&["10.244.0.11"])), &table, owns_all);
    let svc = Service::new(Protocol::Udp, sa("10.96.0.53:53"), "rr");
    assert_eq!(ops, vec![Op::DeleteDest(svc, Destination::new(sa("10.244.0.12:8080"), 1))]);
    let argv = udp_conntrack_cleanups(&ops);
    let want = "-D -f ipv4 -p udp --orig-dst 10.96.0.53 --orig-port-dst 53 --reply-src 10.244.0.12";
    assert_eq!(argv.iter().map(|a| a.join(" ")).collect::<Vec<_>>(), [want]);
}

#[test]
fn a_removed_service_is_deleted_but_only_if_owned() {
    let table = applied(&plan(&desired(&cfg(), &web(&["10.244.0.11"])), &Table::new(), owns_all), Table::new());
    let empty = desired(&cfg(), &state(vec![], vec![]));
    let svc = Service::new(Protocol::Tcp, sa("10.96.0.10:80"), "rr");
    assert_eq!(plan(&empty, &table, owns_all), vec![Op::DeleteService(svc)]);
    assert_eq!(plan(&empty, &table, |_: &Key| false), vec![], "someone else's virtual server was touched");
}

#[test]
fn a_scheduler_or_affinity_change_is_one_update_service() {
    let st = web(&["10.244.0.11"]);
    let table = applied(&plan(&desired(&cfg(), &st), &Table::new(), owns_all), Table::new());
    let lc = PlanConfig { scheduler: "lc".into(), ..cfg() };
    let ops = plan(&desired(&lc, &st), &table, owns_all);
    assert_eq!(ops, vec![Op::UpdateService(Service::new(Protocol::Tcp, sa("10.96.0.10:80"), "lc"))]);

    let mut sticky = svc("web", "10.96.0.10", pb::Protocol::Tcp, 80, 0);
    sticky.session_affinity_timeout_seconds = 10800;
    let ops = plan(&desired(&cfg(), &state(vec![sticky], vec![ep("web", "10.244.0.11")])), &table, owns_all);
    let want = Service::new(Protocol::Tcp, sa("10.96.0.10:80"), "rr").with_persistence(10800);
    assert_eq!(ops, vec![Op::UpdateService(want)]);
}

#[test]
fn an_affinity_beyond_kubernetes_maximum_is_capped_and_reported() {
    let mut sticky = svc("web", "10.96.0.10", pb::Protocol::Tcp, 80, 0);
    sticky.session_affinity_timeout_seconds = u32::MAX;
    let d = desired(&cfg(), &state(vec![sticky], vec![ep("web", "10.244.0.11")]));
    let key = Key::of(&Service::new(Protocol::Tcp, sa("10.96.0.10:80"), "rr"));
    assert_eq!(
        d.services[&key].service,
        Service::new(Protocol::Tcp, sa("10.96.0.10:80"), "rr").with_persistence(86400)
    );
    assert!(d.skipped.iter().any(|s| s.contains("capped at 86400")), "{:?}", d.skipped);
}

#[test]
fn adopting_an_identical_table_is_zero_ops() {
    let st = state(
        vec![
            svc("web", "10.96.0.10", pb::Protocol::Tcp, 80, 30080),
            svc("v6", "fd00:96::10", pb::Protocol::Tcp, 80, 0),
        ],
        vec![ep("web", "10.244.0.11"), ep("web", "10.244.0.12"), ep("v6", "fd00:244::11")],
    );
    let d = desired(&cfg(), &st);
    // What a dump of the kernel returns after a previous kpx programmed it.
    let dump: Vec<(ServiceInfo, Vec<DestinationInfo>)> = d
        .services
        .values()
        .map(|s| {
            let dests = s
                .dests
                .values()
                .map(|dest| DestinationInfo {
                    dest: dest.clone(),
                    active_conns: 3,
                    inactive_conns: 1,
                    persist_conns: 0,
                    stats: Default::default(),
                })
                .collect();
            (ServiceInfo { service: s.service.clone(), stats: Default::default() }, dests)
        })
        .collect();
    assert_eq!(dump.len(), 3, "ClusterIP, NodePort and the IPv6 ClusterIP");
    assert_eq!(plan(&d, &table_from(dump), owns_all), vec![]);
}

#[test]
fn node_ports_external_and_local_policies_pick_their_endpoints() {
    let mut s = svc("web", "10.96.0.10", pb::Protocol::Tcp, 80, 30080);
    s.external_ips = vec!["203.0.113.5".into()];
    s.load_balancer_ips = vec!["198.51.100.7".into()];
    s.external_policy_local = true;
    let mut local = ep("web", "10.244.0.11");
    local.for_local = true;
    let st = state(vec![s], vec![local, ep("web", "10.244.9.9")]);
    let d = desired(&cfg(), &st);
    let dests =
        |a: &str| d.services[&Key { protocol: Protocol::Tcp, addr: sa(a) }].dests.keys().copied().collect::<Vec<_>>();
    assert_eq!(dests("10.96.0.10:80"), vec![sa("10.244.0.11:8080"), sa("10.244.9.9:8080")]);
    for external in ["203.0.113.5:80", "198.51.100.7:80", "192.168.0.10:30080"] {
        assert_eq!(dests(external), vec![sa("10.244.0.11:8080")], "{external}");
    }
    let vips: Vec<String> = d.vips.iter().map(|v| v.to_string()).collect();
    assert_eq!(vips, ["10.96.0.10", "198.51.100.7", "203.0.113.5"], "node addresses are not VIPs");
}

#[test]
fn source_ranges_apply_to_load_balancer_ips_only_and_fail_closed() {
    let mut s = svc("web", "10.96.0.10", pb::Protocol::Tcp, 80, 0);
    s.external_ips = vec!["203.0.113.5".into()];
    s.load_balancer_ips = vec!["198.51.100.7".into()];
    s.load_balancer_source_ranges = vec!["192.168.0.0/24".into(), "fd00::/8".into(), "bogus".into()];
    let d = desired(&cfg(), &state(vec![s.clone()], vec![]));
    let ranges = |a: &str| d.services[&Key { protocol: Protocol::Tcp, addr: sa(a) }].source_ranges.clone();
    assert_eq!(ranges("198.51.100.7:80"), Some(vec!["192.168.0.0/24".to_string()]));
    assert_eq!(ranges("203.0.113.5:80"), None);
    assert_eq!(ranges("10.96.0.10:80"), None);
    assert_eq!(d.skipped, ["ns/web: invalid loadBalancerSourceRange \"bogus\""]);
    s.load_balancer_source_ranges = vec!["bogus".into()];
    let d = desired(&cfg(), &state(vec![s], vec![]));
    assert_eq!(d.services[&Key { protocol: Protocol::Tcp, addr: sa("198.51.100.7:80") }].source_ranges, Some(vec![]));
}

#[test]
fn families_not_served_and_headless_services_program_nothing() {
    let v4only = PlanConfig { families: vec![Family::Inet], ..cfg() };
    let st = state(
        vec![svc("v6", "fd00:96::10", pb::Protocol::Tcp, 80, 0), svc("headless", "None", pb::Protocol::Tcp, 80, 0)],
        vec![],
    );
    assert_eq!(desired(&v4only, &st), Desired::default());
}

/// The services whose entry differs between `a` and `b` (what `AppliedState::apply` reports).
fn changed(a: &AppliedState, b: &AppliedState) -> BTreeSet<String> {
    let names: BTreeSet<&String> = a.services().keys().chain(b.services().keys()).collect();
    names
        .into_iter()
        .filter(|n| match (a.services().get(*n), b.services().get(*n)) {
            (Some(x), Some(y)) => x.service != y.service || x.endpoints != y.endpoints,
            _ => true,
        })
        .cloned()
        .collect()
}

fn big(services: usize, eps: usize, extra: Option<(usize, &str)>) -> AppliedState {
    let mut svcs = Vec::new();
    let mut endpoints = Vec::new();
    for i in 0..services {
        let name = format!("s{i}");
        let ip = format!("10.96.{}.{}", i / 250, i % 250 + 1);
        svcs.push(svc(&name, &ip, pb::Protocol::Tcp, 80, if i % 10 == 0 { 30000 + i as u32 } else { 0 }));
        for e in 0..eps {
            endpoints.push(ep(&name, &format!("10.244.{}.{}", i / 25, (i % 25) * 10 + e + 1)));
        }
    }
    if let Some((i, ip)) = extra {
        endpoints.push(ep(&format!("s{i}"), ip));
    }
    state(svcs, endpoints)
}

#[test]
fn one_endpoint_added_to_a_big_state_touches_one_service_and_plans_one_op() {
    let cfg = cfg();
    let before = big(2000, 10, None);
    let (mut d, mut index) = desired_indexed(&cfg, &before);
    assert_eq!(d, desired(&cfg, &before));
    let table = applied(&plan(&d, &Table::new(), owns_all), Table::new());
    assert_eq!(table.len(), 2200, "2000 ClusterIPs and 200 NodePorts");

    let after = big(2000, 10, Some((1234, "10.244.200.250")));
    let changes = changed(&before, &after);
    assert_eq!(changes, BTreeSet::from(["ns/s1234".to_string()]));
    let up = update_desired(&cfg, &after, &changes, &mut d, &mut index).expect("no shared virtual server");
    let key = Key { protocol: Protocol::Tcp, addr: sa("10.96.4.235:80") };
    assert_eq!(up.touched, BTreeSet::from([key]));
    assert_eq!((up.old.len(), up.vips_added.len(), up.vips_removed.len()), (1, 0, 0));
    let ops = plan_keys(&d, &table, &up.touched, owns_all);
    let svc = Service::new(Protocol::Tcp, sa("10.96.4.235:80"), "rr");
    assert_eq!(ops, vec![Op::AddDest(svc, Destination::new(sa("10.244.200.250:8080"), 1))]);
    assert_eq!(ops, plan(&desired(&cfg, &after), &table, owns_all), "the whole-table plan agrees");
    assert_eq!(d, desired(&cfg, &after));
}

/// A tiny deterministic generator (xorshift), so that failures reproduce.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

/// A small world whose services and endpoints change at random.
#[derive(Clone)]
struct World {
    services: BTreeMap<usize, pb::Service>,
    endpoints: BTreeMap<(usize, usize), pb::Endpoint>,
}

impl World {
    fn state(&self) -> AppliedState {
        state(self.services.values().cloned().collect(), self.endpoints.values().cloned().collect())
    }

    fn service(i: usize, rng: &mut Rng) -> pb::Service {
        let proto = [pb::Protocol::Tcp, pb::Protocol::Udp][rng.below(2)];
        let node_port = if rng.below(2) == 0 { 30000 + i as u32 } else { 0 };
        let mut s = svc(&format!("s{i}"), &format!("10.96.0.{}", i + 1), proto, 80, node_port);
        if rng.below(3) == 0 {
            s.cluster_ips.push(format!("fd00:96::{}", i + 1));
        }
        if rng.below(3) == 0 {
            s.load_balancer_ips = vec![format!("198.51.100.{}", i + 1)];
            s.load_balancer_source_ranges = vec!["192.168.0.0/24".into()];
        }
        s.external_policy_local = rng.below(2) == 0;
        s.session_affinity_timeout_seconds = [0, 10800][rng.below(2)];
        s
    }

    fn step(&mut self, rng: &mut Rng) {
        let i = rng.below(8);
        match rng.below(5) {
            0 => {
                self.services.remove(&i);
                self.endpoints.retain(|(s, _), _| *s != i);
            }
            1 => {
                self.services.insert(i, World::service(i, rng));
            }
            2 => {
                self.endpoints.remove(&(i, rng.below(4)));
            }
            _ if self.services.contains_key(&i) => {
                let j = rng.below(4);
                // Endpoints are shared between services now and then (one pod behind two).
                let ip = if rng.below(2) == 0 { format!("10.244.{i}.{j}") } else { format!("10.244.99.{j}") };
                let mut e = ep(&format!("s{i}"), &ip);
                e.for_local = rng.below(2) == 0;
                if rng.below(3) == 0 {
                    e.ip = format!("fd00:244::{i}:{j}");
                }
                self.endpoints.insert((i, j), e);
            }
            _ => {}
        }
    }
}

#[test]
fn incremental_updates_plan_what_the_whole_table_plans() {
    let cfg = cfg();
    let mut rng = Rng(0x9e3779b97f4a7c15);
    let mut total = 0;
    for round in 0..30 {
        let mut world = World { services: BTreeMap::new(), endpoints: BTreeMap::new() };
        (0..6).for_each(|_| world.step(&mut rng));
        let mut before = world.state();
        let (mut d, mut index) = desired_indexed(&cfg, &before);
        let mut table = applied(&plan(&d, &Table::new(), owns_all), Table::new());
        let mut members = [Family::Inet, Family::Inet6].map(|f| (f, crate::backend::ipvs::companion::members(f, &d)));
        for step in 0..20 {
            // A few changes at once, sometimes none.
            (0..rng.below(3)).for_each(|_| world.step(&mut rng));
            let after = world.state();
            let full = desired(&cfg, &after);
            let ctx = format!("round {round} step {step}");
            let Some(up) = update_desired(&cfg, &after, &changed(&before, &after), &mut d, &mut index) else {
                panic!("{ctx}: no service shares a virtual server here");
            };
            assert_eq!((&d.services, &d.vips), (&full.services, &full.vips), "{ctx}");
            let keys: BTreeSet<Key> = up.touched.iter().copied().chain(draining(&full, &table)).collect();
            let ops = plan_keys(&d, &table, &keys, owns_all);
            assert_eq!(ops, plan(&full, &table, owns_all), "{ctx}");
            for (family, members) in &mut members {
                let old = up.old.iter().map(|(k, s)| (k, s));
                let new = up.touched.iter().filter_map(|k| d.services.get_key_value(k));
                crate::backend::ipvs::companion::update_members(*family, members, old, new);
                assert_eq!(*members, crate::backend::ipvs::companion::members(*family, &full), "{ctx}");
            }
            total += ops.len();
            table = applied(&ops, table);
            before = after;
        }
    }
    assert!(total > 300, "the changes planned only {total} operations");
}

#[test]
fn a_virtual_server_two_services_claim_needs_the_whole_table() {
    let cfg = cfg();
    let mut a = svc("a", "10.96.0.10", pb::Protocol::Tcp, 80, 0);
    a.external_ips = vec!["203.0.113.5".into()];
    let before = state(vec![a.clone()], vec![]);
    let (mut d, mut index) = desired_indexed(&cfg, &before);
    let mut b = svc("b", "10.96.0.11", pb::Protocol::Tcp, 80, 0);
    b.external_ips = vec!["203.0.113.5".into()];
    let after = state(vec![a, b], vec![]);
    let changes = BTreeSet::from(["ns/b".to_string()]);
    assert_eq!(update_desired(&cfg, &after, &changes, &mut d, &mut index), None);
}

#[test]
fn loop_back_lists_this_nodes_endpoints_and_those_of_no_known_node() {
    let on =
        |ip: &str, node: Option<&str>| pb::Endpoint { node_tag: node.map_or(0, kpx_proto::node_tag), ..ep("web", ip) };
    let s = state(
        vec![svc("web", "10.96.0.10", pb::Protocol::Tcp, 80, 0)],
        vec![on("10.244.1.5", Some("node-1")), on("10.244.2.5", Some("node-2")), on("10.244.3.5", None)],
    );
    let d = desired(&cfg(), &s);
    let vs = d.services.values().find(|v| v.kind == VipKind::Cluster).expect("the cluster IP");
    assert_eq!(vs.loop_back, [sa("10.244.1.5:8080"), sa("10.244.3.5:8080")]);
    // Every endpoint still serves the cluster IP, wherever it runs.
    assert_eq!(vs.dests.len(), 3);
}
