//! The codec against the host kernel, in a network namespace of its own: a transaction with
//! every kind of object, read back by a dump (equal to what was written) and by the real `nft`.
//! Needs root, `ip` and `nft`: skips loudly without them, fails under CI=true.

use std::process::Command;

use kpx_nft_netlink::consts::*;
use kpx_nft_netlink::{Chain, Element, Expr, Hook, NftClient, NftError, Rule, Set, SetRef, Verdict};

struct Ns(String);

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

fn netns(tag: &str) -> Option<Ns> {
    let name = format!("kpxnl-{tag}-{}", std::process::id());
    let ok = Command::new("ip").args(["netns", "add", &name]).output().is_ok_and(|o| o.status.success());
    let nft = Command::new("nft").arg("--version").output().is_ok_and(|o| o.status.success());
    if ok && nft {
        return Some(Ns(name));
    }
    let _ = Command::new("ip").args(["netns", "del", &name]).output();
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("CI=true and the nf_tables kernel test cannot run (root, iproute2 and nft are needed)");
    }
    eprintln!("\n**********\nSKIPPED (needs root, ip and nft)\n**********");
    None
}

fn nft(ns: &Ns, args: &[&str]) -> String {
    let out = Command::new("ip").args(["netns", "exec", &ns.0, "nft"]).args(args).output().unwrap();
    assert!(out.status.success(), "nft {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn sample() -> (Vec<Chain>, Set, Vec<Element>, Vec<Rule>) {
    let chains = vec![
        Chain { name: "services".into(), hook: None },
        Chain { name: "nat-prerouting".into(), hook: Some(Hook { kind: "nat".into(), hooknum: 0, priority: -100 }) },
        Chain { name: "endpoint-A".into(), hook: None },
    ];
    let map = Set {
        name: "service-ips".into(),
        flags: NFT_SET_MAP,
        key_type: (7 << 12) | (12 << 6) | 13,
        key_len: 12,
        data_type: Some(NFT_DATA_VERDICT),
        data_len: 0,
        fields: Vec::new(),
        udata: Vec::new(),
        timeout_ms: None,
    };
    let elems = vec![Element {
        key: vec![10, 96, 0, 10, 6, 0, 0, 0, 0, 80, 0, 0],
        verdict: Some(Verdict::Goto("endpoint-A".into())),
        ..Default::default()
    }];
    let rules = vec![
        Rule {
            chain: "nat-prerouting".into(),
            exprs: vec![Expr::Verdict(Verdict::Jump("services".into()))],
            comment: None,
            handle: 0,
        },
        Rule {
            chain: "services".into(),
            exprs: vec![
                Expr::Payload { base: 1, offset: 16, len: 4, dreg: 1 },
                Expr::Meta { key: 16, dreg: 9 },
                Expr::Payload { base: 2, offset: 2, len: 2, dreg: 10 },
                Expr::Lookup { sreg: 1, set: SetRef::Named("service-ips".into()), dreg: Some(0), invert: false },
            ],
            comment: None,
            handle: 0,
        },
        Rule {
            chain: "services".into(),
            exprs: vec![
                Expr::Numgen { dreg: 1, modulus: 2, offset: 0 },
                Expr::Lookup {
                    sreg: 1,
                    set: SetRef::AnonVmap(vec![(0, Verdict::Goto("endpoint-A".into())), (1, Verdict::Drop)]),
                    dreg: Some(0),
                    invert: false,
                },
            ],
            comment: Some("balance".into()),
            handle: 0,
        },
        Rule {
            chain: "endpoint-A".into(),
            exprs: vec![
                Expr::Meta { key: 16, dreg: 1 },
                Expr::Cmp { sreg: 1, op: 0, data: vec![6] },
                Expr::Immediate { dreg: 1, data: vec![10, 244, 1, 2] },
                Expr::Immediate { dreg: 2, data: vec![0x1f, 0x90] },
                Expr::Dnat { family: 2, reg_addr: 1, reg_proto: 2, flags: 3 },
            ],
            comment: None,
            handle: 0,
        },
    ];
    (chains, map, elems, rules)
}

#[test]
fn a_transaction_reads_back_equal_and_nft_lists_it() {
    let Some(ns) = netns("rt") else { return };
    let mut c = NftClient::in_netns(&ns.0).expect("nf_tables in the namespace");
    assert!(c.dump_table(NFPROTO_IPV4, "kube-proxy").unwrap().is_none());
    let (chains, map, elems, rules) = sample();
    let mut b = c.batch(NFPROTO_IPV4, "kube-proxy");
    b.add_table("rules for kube-proxy");
    chains.iter().for_each(|ch| b.add_chain(ch));
    b.add_set(&map);
    rules.iter().for_each(|r| b.add_rule(r));
    b.add_elements("service-ips", &elems);
    c.commit(b).expect("commit");
    let d = c.dump_table(NFPROTO_IPV4, "kube-proxy").unwrap().expect("the table");
    assert_eq!(d.comment.as_deref(), Some("rules for kube-proxy"));
    let mut names: Vec<&str> = d.chains.iter().map(|c| c.name.as_str()).collect();
    names.sort();
    assert_eq!(names, ["endpoint-A", "nat-prerouting", "services"]);
    assert_eq!(d.chains.iter().find(|c| c.name == "nat-prerouting").unwrap().hook, chains[1].hook);
    assert_eq!(d.sets, [map]);
    assert_eq!(d.elements["service-ips"], elems);
    let back: Vec<(String, Vec<Expr>, Option<String>)> =
        d.rules.iter().map(|r| (r.chain.clone(), r.exprs.clone(), r.comment.clone())).collect();
    let want: Vec<(String, Vec<Expr>, Option<String>)> =
        rules.iter().map(|r| (r.chain.clone(), r.exprs.clone(), r.comment.clone())).collect();
    for w in &want {
        assert!(back.contains(w), "{w:?} not read back in {back:#?}");
    }
    let text = nft(&ns, &["list", "table", "ip", "kube-proxy"]);
    for line in [
        "ip daddr . meta l4proto . th dport vmap @service-ips",
        "numgen random mod 2 vmap { 0 : goto endpoint-A, 1 : drop } comment \"balance\"",
        "meta l4proto tcp dnat to 10.244.1.2:8080",
        "10.96.0.10 . tcp . 80 : goto endpoint-A",
        "type nat hook prerouting priority dstnat; policy accept;",
    ] {
        assert!(text.contains(line), "{line:?} not in\n{text}");
    }
}

#[test]
fn a_failed_transaction_changes_nothing() {
    let Some(ns) = netns("fail") else { return };
    let mut c = NftClient::in_netns(&ns.0).unwrap();
    let mut b = c.batch(NFPROTO_IPV4, "kube-proxy");
    b.add_table("t");
    b.add_chain(&Chain { name: "a".into(), hook: None });
    c.commit(b).unwrap();
    let gen_before = c.gen_id().unwrap();
    let mut b = c.batch(NFPROTO_IPV4, "kube-proxy");
    b.add_chain(&Chain { name: "b".into(), hook: None });
    // A jump to a chain that does not exist: the whole transaction is refused.
    b.add_rule(&Rule {
        chain: "a".into(),
        exprs: vec![Expr::Verdict(Verdict::Jump("missing".into()))],
        comment: None,
        handle: 0,
    });
    match c.commit(b) {
        Err(NftError::Kernel { what, errno }) => {
            assert_eq!(errno, 2, "{what}");
            assert!(what.contains("operation 1 of 2"), "{what}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    let d = c.dump_table(NFPROTO_IPV4, "kube-proxy").unwrap().unwrap();
    assert_eq!(d.chains.len(), 1, "chain b was not created: {:?}", d.chains);
    assert_eq!(c.gen_id().unwrap(), gen_before, "nothing committed");
}

#[test]
fn interval_data_maps_and_concatenated_sets_read_back_equal() {
    let Some(ns) = netns("ranges") else { return };
    let mut c = NftClient::in_netns(&ns.0).unwrap();
    let map = Set {
        name: "endpoints-0".into(),
        flags: NFT_SET_MAP | NFT_SET_INTERVAL,
        key_type: 4,
        key_len: 4,
        data_type: Some((7 << 6) | 13),
        data_len: 8,
        ..Default::default()
    };
    let pairs = Set { name: "pairs".into(), key_type: (7 << 6) | 7, key_len: 8, ..Default::default() };
    let start = |k: u32, ip: [u8; 4], port: u16| Element {
        key: k.to_be_bytes().to_vec(),
        value: Some([&ip[..], &port.to_be_bytes(), &[0, 0]].concat()),
        ..Default::default()
    };
    let end = |k: u32| Element { key: k.to_be_bytes().to_vec(), interval_end: true, ..Default::default() };
    // Two adjacent ranges, as nft writes them: each start, and an end where the next starts.
    let elems =
        vec![start(0x20000, [10, 0, 0, 1], 80), end(0x27fff), start(0x27fff, [10, 0, 0, 2], 8080), end(0x2ffff)];
    let dnat = vec![
        Expr::Meta { key: 16, dreg: 1 },
        Expr::Cmp { sreg: 1, op: 0, data: vec![17] },
        Expr::Numgen { dreg: 1, modulus: 65535, offset: 0x20000 },
        Expr::Byteorder { sreg: 1, dreg: 1, op: 1, len: 4, size: 4 },
        Expr::Lookup { sreg: 1, set: SetRef::Named("endpoints-0".into()), dreg: Some(1), invert: false },
        Expr::Dnat { family: 2, reg_addr: 1, reg_proto: 9, flags: 3 },
    ];
    let hairpin = vec![
        Expr::Ct { key: 2, dreg: 1 },
        Expr::Bitwise { sreg: 1, dreg: 1, len: 4, mask: 0x20u32.to_ne_bytes().to_vec(), xor: vec![0; 4] },
        Expr::Cmp { sreg: 1, op: 1, data: vec![0; 4] },
        Expr::Payload { base: 1, offset: 12, len: 4, dreg: 1 },
        Expr::Payload { base: 1, offset: 16, len: 4, dreg: 9 },
        Expr::Lookup { sreg: 1, set: SetRef::Named("pairs".into()), dreg: None, invert: false },
        Expr::Masq { flags: 0x10 },
    ];
    let mut b = c.batch(NFPROTO_IPV4, "kube-proxy");
    b.add_table("t");
    b.add_set(&map);
    b.add_set(&pairs);
    b.add_chain(&Chain { name: "svc".into(), hook: None });
    let rule = |exprs: &Vec<Expr>| Rule { chain: "svc".into(), exprs: exprs.clone(), comment: None, handle: 0 };
    b.add_rule(&rule(&dnat));
    b.add_rule(&rule(&hairpin));
    b.add_elements("endpoints-0", &elems);
    b.add_elements("pairs", &[Element { key: vec![10, 0, 0, 1, 10, 0, 0, 1], ..Default::default() }]);
    c.commit(b).expect("commit");
    let d = c.dump_table(NFPROTO_IPV4, "kube-proxy").unwrap().unwrap();
    assert_eq!(d.sets.iter().find(|s| s.name == "endpoints-0"), Some(&map));
    let mut back = d.elements["endpoints-0"].clone();
    back.sort();
    let mut want = elems.clone();
    want.sort();
    assert_eq!(back, want);
    assert_eq!(d.rules.iter().map(|r| r.exprs.clone()).collect::<Vec<_>>(), [dnat, hairpin]);
    let text = nft(&ns, &["list", "table", "ip", "kube-proxy"]);
    for line in [
        "meta l4proto udp dnat ip to numgen random mod 65535 offset 131072 map @endpoints-0",
        "ct status dnat ip saddr . ip daddr @pairs masquerade fully-random",
    ] {
        assert!(text.contains(line), "{line:?} not in\n{text}");
    }
    // Ranges are replaced whole: delete both, add three, in one transaction.
    let third = [start(0x20000, [10, 0, 0, 1], 80), end(0x25555), start(0x25555, [10, 0, 0, 2], 8080)];
    let mut b = c.batch(NFPROTO_IPV4, "kube-proxy");
    b.del_elements("endpoints-0", &elems);
    b.add_elements(
        "endpoints-0",
        &[&third[..], &[end(0x2aaaa), start(0x2aaaa, [10, 0, 0, 3], 80), end(0x2ffff)]].concat(),
    );
    c.commit(b).expect("replace the ranges");
    let d = c.dump_table(NFPROTO_IPV4, "kube-proxy").unwrap().unwrap();
    assert_eq!(d.elements["endpoints-0"].len(), 6);
}
