//! The ipvs backend on a real kernel: user-mode Linux with IPVS, real TCP traffic from a client
//! namespace through the node (UML's own namespace, where the backend runs) to pod namespaces.
//! See tests/ipvs/mod.rs for the topology and how a test runs inside UML.

mod ipvs;
mod uml;

use ipvs::*;
use kpx_dataplane::stream::Apply;

#[test]
fn round_robin_spreads_connections_over_three_endpoints_and_masquerades() {
    in_uml("round_robin_spreads_connections_over_three_endpoints_and_masquerades", || {
        let _topo = Topology::new(3);
        let mut b = backend();
        let st = state(vec![svc("web", "10.96.0.10", 80, 0)], (1..=3).map(|i| ep("web", i, false)).collect());
        b.apply(&st, &full()).unwrap();
        assert_eq!(b.stats().last_ops, 4, "one service and three real servers");
        let mut answers: Vec<(String, String)> = (0..6).map(|_| answer(&get("tcp", "10.96.0.10:80"))).collect();
        // The client (192.168.0.2) is outside the cluster CIDR: the pods see the node's address.
        assert!(answers.iter().all(|(_, peer)| peer == "10.244.0.1"), "not masqueraded: {answers:?}");
        answers.sort();
        let pods: Vec<&str> = answers.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(pods, ["pod1", "pod1", "pod2", "pod2", "pod3", "pod3"], "\n{}", ipvsadm());
        eprintln!("netlink messages: {} ({:?})", b.stats().messages, b.stats());
    });
}

/// The real server of `addr` in `ipvsadm -Ln` output: its line's words.
fn real_server<'a>(table: &'a str, addr: &str) -> Option<Vec<&'a str>> {
    table
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|w| w.len() > 2 && w[0] == "->" && w[1] == addr)
}

/// `ipvsadm -Sn`: the table without counters.
fn ipvsadm_save() -> String {
    String::from_utf8_lossy(&std::process::Command::new("ipvsadm").arg("-Sn").output().unwrap().stdout).into_owned()
}

/// `ipvsadm -Lnc`: IPVS's connection entries.
fn connections() -> String {
    String::from_utf8_lossy(&std::process::Command::new("ipvsadm").arg("-Lnc").output().unwrap().stdout).into_owned()
}

// Connections that ended normally stay in IPVS as TIME_WAIT for 2 minutes and count as inactive,
// which holds a removed real server back that long (as with kube-proxy): so the only connection
// to this service before the removal is the one held open, and the pod it reached is removed.
#[test]
fn an_endpoint_added_then_removed_drains_gracefully() {
    in_uml("an_endpoint_added_then_removed_drains_gracefully", || {
        let _topo = Topology::new(2);
        let mut b = backend();
        let web = || svc("web", "10.96.0.10", 80, 0);
        b.apply(&state(vec![web()], vec![ep("web", 1, false)]), &full()).unwrap();
        let before = b.stats().messages;
        // A delta: only ns/web is planned.
        b.apply(&state(vec![web()], vec![ep("web", 1, false), ep("web", 2, false)]), &changed(&["ns/web"])).unwrap();
        assert_eq!((b.stats().last_ops, b.stats().messages - before), (1, 1), "adding one endpoint is one message");
        assert_eq!(b.stats().partial_syncs, 1);
        let table = ipvsadm();
        for pod in ["10.244.0.11:8080", "10.244.0.12:8080"] {
            assert_eq!(real_server(&table, pod).map(|w| w[3]), Some("1"), "{pod}:\n{table}");
        }

        let mut held = std::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                "client",
                "bash",
                "-c",
                "exec 3<>/dev/tcp/10.96.0.10/80; echo open; exec sleep 120",
            ])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(held.stdout.take().unwrap()), &mut line).unwrap();
        assert_eq!(line.trim(), "open");
        let conns = connections();
        let (gone, kept) = if conns.contains("10.244.0.11:8080") { (1, 2) } else { (2, 1) };
        let gone_addr = format!("10.244.0.1{gone}:8080");
        assert!(conns.contains(&gone_addr), "the held connection is not in IPVS:\n{conns}");

        b.apply(&state(vec![web()], vec![ep("web", kept, false)]), &changed(&["ns/web"])).unwrap();
        let table = ipvsadm();
        let rs = real_server(&table, &gone_addr).unwrap_or_else(|| panic!("deleted with a connection:\n{table}"));
        assert_eq!(rs[3], "0", "not at weight 0:\n{table}");
        assert_eq!(b.stats().draining, 1);
        let kept_pod = format!("pod{kept}");
        assert_eq!(pods_answering("10.96.0.10:80", 3), [kept_pod.as_str(); 3], "new connections to a draining pod");

        // The connection ends (a reset: it has unread data); once IPVS forgets it, the pod goes.
        let _ = held.kill();
        let _ = held.wait();
        wait_until(std::time::Duration::from_secs(30), "deleted after its connection closed", || {
            b.tick().unwrap();
            real_server(&ipvsadm(), &gone_addr).is_none()
        });
        assert_eq!(b.stats().draining, 0);
        assert_eq!(b.stats().partial_syncs, b.stats().syncs - 1, "only the first sync compared the whole table");
        assert_eq!(pods_answering("10.96.0.10:80", 2), [kept_pod.as_str(); 2]);
    });
}

#[test]
fn session_affinity_keeps_a_client_on_one_endpoint() {
    in_uml("session_affinity_keeps_a_client_on_one_endpoint", || {
        let _topo = Topology::new(3);
        let mut b = backend();
        let mut web = svc("web", "10.96.0.10", 80, 0);
        web.session_affinity_timeout_seconds = 600;
        b.apply(&state(vec![web], (1..=3).map(|i| ep("web", i, false)).collect()), &full()).unwrap();
        let table = ipvsadm();
        assert!(table.contains("persistent 600"), "no persistence:\n{table}");
        let pods = pods_answering("10.96.0.10:80", 6);
        assert!(pods.iter().all(|p| *p == pods[0]), "one client, several pods: {pods:?}");
    });
}

#[test]
fn node_port_reaches_the_endpoints_on_the_node_address() {
    in_uml("node_port_reaches_the_endpoints_on_the_node_address", || {
        let _topo = Topology::new(2);
        let mut b = backend();
        let st = state(vec![svc("web", "10.96.0.10", 80, 30080)], vec![ep("web", 1, false), ep("web", 2, false)]);
        b.apply(&st, &full()).unwrap();
        let answers: Vec<(String, String)> = (0..4).map(|_| answer(&get("tcp", "192.168.0.10:30080"))).collect();
        let mut pods: Vec<&str> = answers.iter().map(|(p, _)| p.as_str()).collect();
        pods.sort();
        assert_eq!(pods, ["pod1", "pod1", "pod2", "pod2"], "\n{}", ipvsadm());
        assert!(answers.iter().all(|(_, peer)| peer == "10.244.0.1"), "NodePort traffic not masqueraded: {answers:?}");
        // The node address is not a VIP: it stays off kube-ipvs0.
        let out = std::process::Command::new("ip").args(["-o", "addr", "show", "dev", "kube-ipvs0"]).output().unwrap();
        let addrs = String::from_utf8_lossy(&out.stdout);
        assert!(addrs.contains("10.96.0.10/32") && !addrs.contains("192.168.0.10"), "{addrs}");
    });
}

#[test]
fn a_restarted_backend_adopts_the_table_with_zero_operations() {
    in_uml("a_restarted_backend_adopts_the_table_with_zero_operations", || {
        let _topo = Topology::new(2);
        let st = state(
            vec![svc("web", "10.96.0.10", 80, 30080), svc("v6", "fd00:96::10", 80, 0)],
            vec![ep("web", 1, false), ep("web", 2, false), ep("v6", 1, true)],
        );
        let mut first = backend();
        first.apply(&st, &full()).unwrap();
        let table = ipvsadm_save();
        drop(first);
        // Between the two runs the kernel keeps serving.
        assert_eq!(pods_answering("10.96.0.10:80", 2).len(), 2);
        let mut second = backend();
        second.apply(&st, &full()).unwrap();
        assert_eq!(second.stats().last_ops, 0, "a restart changed the table:\n{table}\n{}", ipvsadm());
        assert_eq!(second.stats().dumps, 1);
        assert_eq!(ipvsadm_save(), table);
        assert_eq!(pods_answering("192.168.0.10:30080", 2).len(), 2);
    });
}

#[test]
fn a_virtual_server_deleted_by_hand_comes_back_at_the_reconcile() {
    in_uml("a_virtual_server_deleted_by_hand_comes_back_at_the_reconcile", || {
        let _topo = Topology::new(2);
        let mut b = backend();
        let st = state(vec![svc("web", "10.96.0.10", 80, 0)], vec![ep("web", 1, false), ep("web", 2, false)]);
        b.apply(&st, &full()).unwrap();
        // Someone else's virtual server, on an address kpx does not manage, is left alone.
        let status = std::process::Command::new("ipvsadm").args(["-A", "-t", "172.16.0.1:80", "-s", "rr"]).status();
        assert!(status.unwrap().success());
        let status = std::process::Command::new("ipvsadm").args(["-D", "-t", "10.96.0.10:80"]).status();
        assert!(status.unwrap().success());
        assert_eq!(get("tcp", "10.96.0.10:80"), "refused", "the virtual server is still there");
        b.reconcile().unwrap();
        assert_eq!(b.stats().last_ops, 3, "service and two real servers");
        let mut pods = pods_answering("10.96.0.10:80", 2);
        pods.sort();
        assert_eq!(pods, ["pod1", "pod2"]);
        assert!(ipvsadm().contains("172.16.0.1:80"), "someone else's virtual server was deleted");
    });
}

#[test]
fn ipv6_cluster_ip_round_robin() {
    in_uml("ipv6_cluster_ip_round_robin", || {
        let _topo = Topology::new(2);
        let mut b = backend();
        let st = state(vec![svc("web", "fd00:96::10", 80, 0)], vec![ep("web", 1, true), ep("web", 2, true)]);
        b.apply(&st, &full()).unwrap();
        let answers: Vec<(String, String)> = (0..4).map(|_| answer(&get("tcp", "[fd00:96::10]:80"))).collect();
        let mut pods: Vec<&str> = answers.iter().map(|(p, _)| p.as_str()).collect();
        pods.sort();
        assert_eq!(pods, ["pod1", "pod1", "pod2", "pod2"], "\n{}", ipvsadm());
        assert!(answers.iter().all(|(_, peer)| peer == "fd00:244::1"), "not masqueraded: {answers:?}");
    });
}

#[test]
fn local_external_policy_keeps_node_port_traffic_on_local_endpoints_unmasqueraded() {
    in_uml("local_external_policy_keeps_node_port_traffic_on_local_endpoints_unmasqueraded", || {
        let _topo = Topology::new(2);
        let mut b = backend();
        let mut web = svc("web", "10.96.0.10", 80, 30080);
        web.external_policy_local = true;
        let mut local = ep("web", 1, false);
        local.for_local = true;
        b.apply(&state(vec![web], vec![local, ep("web", 2, false)]), &full()).unwrap();
        let answers: Vec<(String, String)> = (0..4).map(|_| answer(&get("tcp", "192.168.0.10:30080"))).collect();
        assert!(answers.iter().all(|(pod, _)| pod == "pod1"), "a remote endpoint got external traffic: {answers:?}");
        assert!(answers.iter().all(|(_, peer)| peer == "192.168.0.2"), "client address not preserved: {answers:?}");
        let mut pods = pods_answering("10.96.0.10:80", 4);
        pods.sort();
        assert_eq!(pods, ["pod1", "pod1", "pod2", "pod2"], "ClusterIP traffic uses every endpoint");
    });
}

#[test]
fn a_pod_reaches_itself_through_its_service_hairpin() {
    in_uml("a_pod_reaches_itself_through_its_service_hairpin", || {
        let _topo = Topology::new(1);
        let mut b = backend();
        b.apply(&state(vec![svc("web", "10.96.0.10", 80, 0)], vec![ep("web", 1, false)]), &full()).unwrap();
        let (pod, peer) = answer(&get_from("pod1", "tcp", "10.96.0.10:80"));
        assert_eq!((pod.as_str(), peer.as_str()), ("pod1", "10.244.0.1"), "hairpin traffic must be masqueraded");
    });
}

#[test]
fn a_removed_udp_endpoint_goes_at_once_with_its_conntrack_entries() {
    in_uml("a_removed_udp_endpoint_goes_at_once_with_its_conntrack_entries", || {
        let _topo = Topology::new(2);
        let mut b = backend();
        let mut dns = svc("dns", "10.96.0.53", 53, 0);
        dns.ports[0].protocol = kpx_proto::v1::Protocol::Udp as i32;
        b.apply(&state(vec![dns.clone()], vec![ep("dns", 1, false), ep("dns", 2, false)]), &full()).unwrap();
        let mut pods: Vec<String> = (0..2).map(|_| answer(&get("udp", "10.96.0.53:53")).0).collect();
        pods.sort();
        assert_eq!(pods, ["pod1", "pod2"]);
        let tracked = |ep: &str| {
            let out = std::process::Command::new("conntrack").args(["-L", "-p", "udp", "--reply-src", ep]).output();
            String::from_utf8_lossy(&out.unwrap().stdout).lines().count()
        };
        assert!(tracked("10.244.0.11") > 0, "no conntrack entry for the UDP flow to pod1");
        b.apply(&state(vec![dns], vec![ep("dns", 2, false)]), &full()).unwrap();
        assert!(real_server(&ipvsadm(), "10.244.0.11:8080").is_none(), "UDP real server kept:\n{}", ipvsadm());
        assert_eq!(b.stats().conntrack_deletes, 1);
        assert_eq!(tracked("10.244.0.11"), 0, "conntrack entries to the removed endpoint left");
        assert_eq!(answer(&get("udp", "10.96.0.53:53")).0, "pod2");
    });
}

#[test]
fn load_balancer_source_ranges_admit_only_their_sources() {
    in_uml("load_balancer_source_ranges_admit_only_their_sources", || {
        let _topo = Topology::new(1);
        let mut b = backend();
        let lb = |range: &str| {
            let mut web = svc("web", "10.96.0.10", 80, 0);
            web.load_balancer_ips = vec!["203.0.113.10".into()];
            web.load_balancer_source_ranges = vec![range.into()];
            state(vec![web], vec![ep("web", 1, false)])
        };
        b.apply(&lb("192.168.0.0/30"), &full()).unwrap();
        assert_eq!(answer(&get("tcp", "203.0.113.10:80")).0, "pod1", "the client is in the range");
        b.apply(&lb("10.0.0.0/8"), &full()).unwrap();
        assert_eq!(get("tcp", "203.0.113.10:80"), "timeout", "a source outside the range got through");
        // The ClusterIP has no source ranges.
        assert_eq!(answer(&get("tcp", "10.96.0.10:80")).0, "pod1");
    });
}

/// A process on the node listening on every address (here on 0.0.0.0:2222), as an sshd or a
/// kubelet would: the service IPs on kube-ipvs0 are the node's addresses too, but like
/// kube-proxy (KUBE-IPVS-FILTER, kubernetes#72236) kpx answers on them only on service ports.
/// With FORWARD's policy DROP, service traffic still flows (KUBE-FORWARD accepts it).
#[test]
fn a_host_port_is_not_reachable_through_a_service_ip() {
    in_uml("a_host_port_is_not_reachable_through_a_service_ip", || {
        let _topo = Topology::new(2);
        let mut host = std::process::Command::new(TESTPOD)
            .args(["serve", "node", "0.0.0.0:2222"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(host.stdout.take().unwrap()), &mut line).unwrap();
        assert_eq!(line.trim(), "ready");
        let out = std::process::Command::new("iptables-legacy").args(["-P", "FORWARD", "DROP"]).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let mut b = backend();
        let st = state(vec![svc("web", "10.96.0.10", 80, 0)], vec![ep("web", 1, false), ep("web", 2, false)]);
        b.apply(&st, &full()).unwrap();

        // The host process answers on the node's address; the service on its port.
        assert_eq!(answer(&get("tcp", "192.168.0.10:2222")).0, "node");
        let pods = pods_answering("10.96.0.10:80", 4);
        assert!(pods.iter().all(|p| p.starts_with("pod")), "{pods:?}");
        // Through the service IP on any other port: refused, not the host process.
        assert_eq!(get("tcp", "10.96.0.10:2222"), "refused", "\n{}", iptables_filter());
        assert_eq!(get("udp", "10.96.0.10:2222"), "refused", "\n{}", iptables_filter());
        let _ = host.kill();
        let _ = host.wait();
    });
}

fn iptables_filter() -> String {
    let out = std::process::Command::new("iptables-legacy-save").args(["-t", "filter"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}
