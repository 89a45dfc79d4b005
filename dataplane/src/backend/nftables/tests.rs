//! Golden tests of the render (kube-proxy's own test conventions: pod IPs 10.0.0.0/8 and
//! 10.180.x, cluster IPs 172.30.0.x, LB IPs 1.2.3.4 / 5.6.7.8, node IP 192.168.0.2), and of the
//! plans between states.

use std::sync::Arc;

use kpx_nft_netlink::Batch;
use kpx_nft_netlink::consts::NFPROTO_IPV4;
use kpx_proto::v1 as pb;

use super::desired;
use super::endpoints::Slots;
use super::layout::{self, Objects};
use super::owners::Owners;
use super::plan::{PlanStats, plan};
use super::render::render_service;
use crate::backend::iptables::render::{IpFamily, RenderConfig};
use crate::state::ServiceEntry;

fn cfg() -> RenderConfig {
    RenderConfig {
        family: IpFamily::V4,
        cluster_cidr: Some("10.0.0.0/8".into()),
        masquerade_all: false,
        node_ips: vec!["192.168.0.2".parse().unwrap()],
        node_name: "test-node".into(),
        localhost_node_ports: false,
    }
}

fn svc(ns: &str, name: &str, cip: &str, f: impl FnOnce(&mut pb::Service)) -> pb::Service {
    let mut s = pb::Service {
        namespace: ns.into(),
        name: name.into(),
        r#type: pb::ServiceType::ClusterIp as i32,
        cluster_ips: vec![cip.into()],
        ports: vec![pb::ServicePort { name: "p80".into(), protocol: pb::Protocol::Tcp as i32, port: 80, node_port: 0 }],
        ..Default::default()
    };
    f(&mut s);
    s
}

fn entry(s: pb::Service, eps: &[(&str, bool, bool)]) -> Arc<ServiceEntry> {
    let key = format!("{}/{}", s.namespace, s.name);
    let endpoints = eps
        .iter()
        .map(|(ip, cluster, local)| {
            let e = pb::Endpoint {
                service: key.clone(),
                ip: ip.to_string(),
                ports: vec![pb::EndpointPort { name: "p80".into(), port: 80 }],
                for_cluster: *cluster,
                for_local: *local,
                node_tag: 0,
            };
            (ip.to_string(), e)
        })
        .collect();
    Arc::new(ServiceEntry { service: s, endpoints })
}

fn text(e: &ServiceEntry) -> String {
    let (o, skipped) = render_service(&cfg(), e, &mut Slots::default());
    assert!(skipped.is_empty(), "{skipped:?}");
    o.text(IpFamily::V4)
}

#[test]
fn cluster_ip_service_reads_like_kube_proxy() {
    let e = entry(svc("ns1", "svc1", "172.30.0.41", |_| {}), &[("10.180.0.1", true, false)]);
    // kube-proxy's service chain; its endpoints are a range of an endpoint map, not chains, and
    // its masquerade rule is the one in `services` (next test).
    let want = "\
add chain ip kube-proxy service-ULMVA6XW-ns1/svc1/tcp/p80
add rule ip kube-proxy service-ULMVA6XW-ns1/svc1/tcp/p80 meta l4proto tcp dnat ip to numgen random mod 65535 map @endpoints-0
add element ip kube-proxy cluster-ips { 172.30.0.41 }
add element ip kube-proxy endpoints-0 { 0-65534 : 10.180.0.1 . 80 }
add element ip kube-proxy hairpin-endpoints { 10.180.0.1 . 10.180.0.1 }
add element ip kube-proxy service-ips { 172.30.0.41 . tcp . 80 : goto service-ULMVA6XW-ns1/svc1/tcp/p80 }
";
    assert_eq!(text(&e), want);
}

#[test]
fn off_cluster_traffic_to_cluster_ips_is_marked_once_before_the_dispatch() {
    let services = |cfg: &RenderConfig| -> Vec<String> {
        let t = layout::base(cfg).text(IpFamily::V4);
        t.lines().filter(|l| l.starts_with("add rule ip kube-proxy services ")).map(String::from).collect()
    };
    let masq = "add rule ip kube-proxy services ip daddr @cluster-ips ip saddr != 10.0.0.0/8 jump mark-for-masquerade comment \"masquerade traffic to cluster IPs from outside the cluster\"";
    let rules = services(&cfg());
    assert_eq!(rules.len(), 3, "{rules:#?}");
    assert_eq!(rules[0], masq, "first, before `services` goes to a service chain");
    let all = RenderConfig { masquerade_all: true, ..cfg() };
    assert!(services(&all)[0].contains("ip daddr @cluster-ips jump mark-for-masquerade"), "{:?}", services(&all));
    // Neither a cluster CIDR of this family nor --masquerade-all: nothing to mark.
    let none = RenderConfig { cluster_cidr: Some("fd00::/48".into()), ..cfg() };
    assert_eq!(services(&none).len(), 2);
}

#[test]
fn endpoints_share_the_range_and_chains_get_ranges_of_their_own() {
    let eps = [("10.180.0.1", true, false), ("10.180.0.2", true, false), ("10.180.0.3", true, true)];
    let s = svc("ns2", "svc2", "172.30.0.42", |s| {
        s.ports[0].node_port = 3001;
        s.external_policy_local = true;
    });
    let (o, _) = render_service(&cfg(), &entry(s, &eps), &mut Slots::default());
    let t = o.text(IpFamily::V4);
    for line in [
        "add rule ip kube-proxy service-42NFTM6N-ns2/svc2/tcp/p80 meta l4proto tcp dnat ip to numgen random mod 65535 map @endpoints-0",
        "add rule ip kube-proxy local-42NFTM6N-ns2/svc2/tcp/p80 meta l4proto tcp dnat ip to numgen random mod 65535 offset 65536 map @endpoints-0",
        "add element ip kube-proxy endpoints-0 { 0-21844 : 10.180.0.1 . 80 }",
        "add element ip kube-proxy endpoints-0 { 21845-43689 : 10.180.0.2 . 80 }",
        "add element ip kube-proxy endpoints-0 { 43690-65534 : 10.180.0.3 . 80 }",
        "add element ip kube-proxy endpoints-0 { 65536-131070 : 10.180.0.3 . 80 }",
    ] {
        assert!(t.lines().any(|l| l == line), "missing {line}\nin\n{t}");
    }
    assert!(!t.contains("endpoint-"), "no endpoint chains without affinity:\n{t}");
}

#[test]
fn load_balancer_with_source_ranges_and_affinity() {
    let s = svc("ns5", "svc5", "172.30.0.45", |s| {
        s.r#type = pb::ServiceType::LoadBalancer as i32;
        s.ports[0].node_port = 3002;
        s.load_balancer_ips = vec!["5.6.7.8".into()];
        s.load_balancer_source_ranges = vec!["203.0.113.0/25".into()];
        s.session_affinity_timeout_seconds = 10800;
    });
    let t = text(&entry(s, &[("10.180.0.3", true, false)]));
    for line in [
        "add set ip kube-proxy affinity-GTK6MW7G-ns5/svc5/tcp/p80__10.180.0.3/80 { type ipv4_addr ; flags dynamic,timeout ; timeout 10800s ; }",
        "add rule ip kube-proxy service-HVFWP5L3-ns5/svc5/tcp/p80 ip saddr @affinity-GTK6MW7G-ns5/svc5/tcp/p80__10.180.0.3/80 goto endpoint-GTK6MW7G-ns5/svc5/tcp/p80__10.180.0.3/80",
        "add rule ip kube-proxy endpoint-GTK6MW7G-ns5/svc5/tcp/p80__10.180.0.3/80 update @affinity-GTK6MW7G-ns5/svc5/tcp/p80__10.180.0.3/80 { ip saddr }",
        "add rule ip kube-proxy external-HVFWP5L3-ns5/svc5/tcp/p80 jump mark-for-masquerade comment \"masquerade traffic from external\"",
        "add rule ip kube-proxy external-HVFWP5L3-ns5/svc5/tcp/p80 goto service-HVFWP5L3-ns5/svc5/tcp/p80",
        "add rule ip kube-proxy firewall-HVFWP5L3-ns5/svc5/tcp/p80 ip saddr 203.0.113.0/25 return",
        "add rule ip kube-proxy firewall-HVFWP5L3-ns5/svc5/tcp/p80 drop comment \"ns5/svc5:p80 not in loadBalancerSourceRanges\"",
        "add element ip kube-proxy firewall-ips { 5.6.7.8 . tcp . 80 : goto firewall-HVFWP5L3-ns5/svc5/tcp/p80 }",
        "add element ip kube-proxy service-ips { 5.6.7.8 . tcp . 80 : goto external-HVFWP5L3-ns5/svc5/tcp/p80 }",
        "add element ip kube-proxy service-nodeports { tcp . 3002 : goto external-HVFWP5L3-ns5/svc5/tcp/p80 }",
    ] {
        assert!(t.lines().any(|l| l == line), "missing {line}\nin\n{t}");
    }
}

#[test]
fn no_endpoints_reject_and_local_policies_drop() {
    let none = entry(svc("ns6", "svc6", "172.30.0.46", |_| {}), &[]);
    assert!(
        text(&none)
            .contains("add element ip kube-proxy no-endpoint-services { 172.30.0.46 . tcp . 80 : goto reject-chain }")
    );
    // externalTrafficPolicy Local, endpoints only elsewhere (the controlplane's hint says so).
    let local = entry(
        svc("ns2", "svc2", "172.30.0.42", |s| {
            s.ports[0].node_port = 3001;
            s.external_ips = vec!["192.168.99.22".into()];
            s.external_policy_local = true;
            s.families_with_endpoints = vec!["IPv4".into()];
        }),
        &[],
    );
    let t = text(&local);
    for line in [
        "add element ip kube-proxy no-endpoint-nodeports { tcp . 3001 : drop }",
        "add element ip kube-proxy no-endpoint-services { 192.168.99.22 . tcp . 80 : drop }",
        // The cluster IP follows internalTrafficPolicy (Cluster): no endpoints at all here.
        "add element ip kube-proxy no-endpoint-services { 172.30.0.42 . tcp . 80 : goto reject-chain }",
    ] {
        assert!(t.lines().any(|l| l == line), "missing {line}\nin\n{t}");
    }
    // With a local endpoint: external traffic short-circuits pod and local sources to the
    // cluster chain and goes to the local chain.
    let local = entry(
        svc("ns2", "svc2", "172.30.0.42", |s| {
            s.ports[0].node_port = 3001;
            s.external_policy_local = true;
        }),
        &[("10.180.0.2", true, true)],
    );
    let t = text(&local);
    for line in [
        "add rule ip kube-proxy external-42NFTM6N-ns2/svc2/tcp/p80 ip saddr 10.0.0.0/8 goto service-42NFTM6N-ns2/svc2/tcp/p80 comment \"short-circuit pod traffic\"",
        "add rule ip kube-proxy external-42NFTM6N-ns2/svc2/tcp/p80 fib saddr type local jump mark-for-masquerade comment \"masquerade local traffic\"",
        "add rule ip kube-proxy external-42NFTM6N-ns2/svc2/tcp/p80 goto local-42NFTM6N-ns2/svc2/tcp/p80",
    ] {
        assert!(t.lines().any(|l| l == line), "missing {line}\nin\n{t}");
    }
}

#[test]
fn hostile_names_render_nothing() {
    for (ns, name) in [("a/b", "c"), ("ns", "x\ny"), ("ns", "q\"")] {
        let e = entry(svc(ns, name, "172.30.0.50", |_| {}), &[("10.180.0.9", true, false)]);
        let (o, skipped) = render_service(&cfg(), &e, &mut Slots::default());
        assert_eq!(o, Objects::default(), "{ns}/{name}");
        assert_eq!(skipped.len(), 1);
    }
}

#[test]
fn a_percent_sign_leaves_affinity_out() {
    // The kernel reads '%' in a set name as an anonymous set's template and refuses it.
    let s = svc("ns", "%s%n", "172.30.0.50", |s| s.session_affinity_timeout_seconds = 60);
    let (o, skipped) = render_service(&cfg(), &entry(s, &[("10.180.0.9", true, false)]), &mut Slots::default());
    assert!(o.sets.is_empty(), "{:?}", o.sets.keys());
    assert!(skipped.iter().any(|s| s.contains("'%'")), "{skipped:?}");
    let s = svc("ns", "%s%n", "172.30.0.50", |_| {});
    let (o, skipped) = render_service(&cfg(), &entry(s, &[("10.180.0.9", true, false)]), &mut Slots::default());
    assert!(skipped.is_empty() && !o.chains.is_empty(), "without affinity there is no set to name");
}

#[test]
fn names_past_255_bytes_leave_the_port_out() {
    // The kernel refuses a longer name, and with it the whole transaction.
    let long = "p".repeat(240);
    let s = svc("ns", "svc", "172.30.0.50", |s| s.ports[0].name = long.clone());
    let mut e = entry(s, &[]);
    let eps: Vec<_> = e.endpoints.values().cloned().collect();
    assert!(eps.is_empty());
    Arc::get_mut(&mut e).unwrap().endpoints.insert(
        "10.180.0.9".into(),
        pb::Endpoint {
            service: "ns/svc".into(),
            ip: "10.180.0.9".into(),
            ports: vec![pb::EndpointPort { name: long.clone(), port: 80 }],
            for_cluster: true,
            for_local: false,
            node_tag: 0,
        },
    );
    let (o, skipped) = render_service(&cfg(), &e, &mut Slots::default());
    assert!(o.chains.is_empty(), "{:?}", o.chains.keys());
    assert!(skipped.iter().any(|s| s.contains("too long")), "{skipped:?}");
}

/// One service's objects as a sync installs them (hairpin pairs apart).
fn lowered(eps: &[(&str, bool, bool)]) -> super::layout::Lowered {
    let e = entry(svc("ns1", "svc1", "172.30.0.41", |_| {}), eps);
    let (o, _) = render_service(&cfg(), &e, &mut Slots::default());
    desired::installed(&cfg(), "ns1/svc1", &o, &mut Owners::default()).0
}

#[test]
fn one_endpoint_more_replaces_the_chains_ranges_and_nothing_else() {
    let before = lowered(&[("10.180.0.1", true, false), ("10.180.0.2", true, false)]);
    let after = lowered(&[("10.180.0.1", true, false), ("10.180.0.2", true, false), ("10.180.0.3", true, false)]);
    let mut b = Batch::new(NFPROTO_IPV4, layout::TABLE, 0);
    let st = plan(&before, &after, &mut b);
    // Two ranges (start and end each) go, three come: no chain, no rule.
    assert_eq!(st, PlanStats { elements_deleted: 4, elements_added: 6, ..Default::default() }, "{}", st.describe());
    assert_eq!(b.ops, 2);
    let (bytes, _) = b.finish();
    assert!(bytes.len() < 1024, "{} bytes", bytes.len());
    let mut b = Batch::new(NFPROTO_IPV4, layout::TABLE, 0);
    assert!(plan(&after, &after, &mut b).is_empty());
    assert_eq!(b.ops, 0);
    let mut b = Batch::new(NFPROTO_IPV4, layout::TABLE, 0);
    let st = plan(&after, &before, &mut b);
    assert_eq!((st.elements_deleted, st.elements_added, st.rules_written), (6, 4, 0));
}

#[test]
fn with_affinity_endpoints_keep_kube_proxys_chains() {
    let mut s = svc("ns1", "svc1", "172.30.0.41", |s| s.session_affinity_timeout_seconds = 60);
    let e = entry(s.clone(), &[("10.180.0.1", true, false), ("10.180.0.2", true, false)]);
    let t = text(&e);
    assert!(t.contains("numgen random mod 2 vmap { 0 : goto endpoint-"), "{t}");
    assert!(!t.contains("endpoints-"), "{t}");
    s.session_affinity_timeout_seconds = 0;
    assert!(!text(&entry(s, &[("10.180.0.1", true, false)])).contains("add chain ip kube-proxy endpoint-"));
}

#[test]
fn a_new_affinity_timeout_rewrites_the_chains_reading_its_sets() {
    let render = |seconds| {
        let s = svc("ns1", "svc1", "172.30.0.41", |s| s.session_affinity_timeout_seconds = seconds);
        let (o, _) = render_service(&cfg(), &entry(s, &[("10.180.0.1", true, false)]), &mut Slots::default());
        o.lower(IpFamily::V4)
    };
    let mut b = Batch::new(NFPROTO_IPV4, layout::TABLE, 0);
    let st = plan(&render(60), &render(120), &mut b);
    // The set is deleted and added again; the kernel would refuse that while the service
    // chain's lookup and the endpoint chain's update still read it.
    assert_eq!((st.sets_deleted, st.sets_added, st.chains_rewritten), (1, 1, 2), "{}", st.describe());
}

#[test]
fn last_endpoint_gone_swaps_the_service_ips_element_for_a_reject() {
    let before = lowered(&[("10.180.0.1", true, false)]);
    let after = lowered(&[]);
    let mut b = Batch::new(NFPROTO_IPV4, layout::TABLE, 0);
    let st = plan(&before, &after, &mut b);
    // service-ips and the range's two elements go; no-endpoint-services comes.
    assert_eq!((st.elements_deleted, st.elements_added, st.chains_deleted), (3, 1, 1), "{}", st.describe());
}

/// The hairpin pairs a service renders, with each endpoint's node: `Some(name)` or unknown.
fn hairpin_pairs(f: impl FnOnce(&mut pb::Service), nodes: &[(&str, Option<&str>)]) -> Vec<String> {
    let mut e = entry(svc("ns1", "svc1", "172.30.0.41", f), &[]);
    let eps = &mut Arc::get_mut(&mut e).unwrap().endpoints;
    for (ip, node) in nodes {
        let ep = pb::Endpoint {
            service: "ns1/svc1".into(),
            ip: ip.to_string(),
            ports: vec![pb::EndpointPort { name: "p80".into(), port: 80 }],
            for_cluster: true,
            node_tag: node.map_or(0, kpx_proto::node_tag),
            ..Default::default()
        };
        eps.insert(ip.to_string(), ep);
    }
    let t = text(&e);
    t.lines().filter(|l| l.contains("hairpin-endpoints {")).map(|l| l.split('{').nth(1).unwrap().into()).collect()
}

#[test]
fn hairpin_pairs_only_for_endpoints_this_node_can_see_reach_themselves() {
    let nodes = [("10.180.0.1", Some("test-node")), ("10.180.0.2", Some("other-node")), ("10.180.0.3", None)];
    // Cluster IP: a connection from an endpoint to itself starts where the endpoint runs.
    let pairs = hairpin_pairs(|_| {}, &nodes);
    assert_eq!(pairs, [" 10.180.0.1 . 10.180.0.1 }", " 10.180.0.3 . 10.180.0.3 }"], "mine and the unknown one");
    // A node port under the Cluster policy: traffic from other nodes is masqueraded anyway.
    assert_eq!(hairpin_pairs(|s| s.ports[0].node_port = 30080, &nodes).len(), 2);
    // Under the Local policy, pod traffic from another node short-circuits to the service
    // chain unmasqueraded and may pick its own pod: every endpoint keeps its pair.
    let local = hairpin_pairs(
        |s| {
            s.ports[0].node_port = 30080;
            s.external_policy_local = true;
        },
        &nodes,
    );
    assert_eq!(local.len(), 3, "{local:?}");
    // Local policy without any external address: nothing arrives from other nodes.
    assert_eq!(hairpin_pairs(|s| s.external_policy_local = true, &nodes).len(), 2);
}
