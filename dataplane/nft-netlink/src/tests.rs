use crate::consts::*;
use crate::expr::{Expr, SetRef, Verdict};
use crate::objects::{self, Batch, Element, Rule};
use crate::reply::{Frame, frames};
use crate::wire::{Writer, attrs};

fn exprs() -> Vec<Expr> {
    vec![
        Expr::Payload { base: 1, offset: 16, len: 4, dreg: 1 },
        Expr::Meta { key: 16, dreg: 9 },
        Expr::MetaSet { key: 3, sreg: 1 },
        Expr::Ct { key: 0, dreg: 1 },
        Expr::Cmp { sreg: 1, op: 1, data: vec![10] },
        Expr::Bitwise { sreg: 1, dreg: 1, len: 4, mask: vec![0, 0, 0, 255], xor: vec![0; 4] },
        Expr::Immediate { dreg: 2, data: vec![0, 80] },
        Expr::Verdict(Verdict::Goto("service-X".into())),
        Expr::Verdict(Verdict::Drop),
        Expr::Lookup { sreg: 1, set: SetRef::Named("service-ips".into()), dreg: Some(0), invert: false },
        Expr::Lookup { sreg: 1, set: SetRef::Named("cluster-ips".into()), dreg: None, invert: true },
        Expr::Numgen { dreg: 1, modulus: 3, offset: 7 },
        Expr::Fib { flags: 2, result: 3, dreg: 1 },
        Expr::Dnat { family: 2, reg_addr: 1, reg_proto: 2, flags: 3 },
        Expr::Masq { flags: 0x10 },
        Expr::Reject { kind: 0, code: 3 },
        Expr::Dynset { op: 1, sreg_key: 1, set: "affinity-X".into() },
    ]
}

#[test]
fn expressions_round_trip() {
    for e in exprs() {
        let mut w = Writer::new();
        e.encode(&mut w, 0);
        let (_, elem) = attrs(&w.buf).next().unwrap();
        assert_eq!(Expr::decode(elem), e, "{e}");
    }
}

#[test]
fn unknown_and_malformed_expressions_decode_to_unknown() {
    let mut w = Writer::new();
    let n = w.nest(NFTA_LIST_ELEM);
    w.str(NFTA_EXPR_NAME, "counter");
    w.nest_end(n);
    assert_eq!(Expr::decode(attrs(&w.buf).next().unwrap().1), Expr::Unknown("counter".into()));
    // A cmp without its data.
    let mut w = Writer::new();
    let n = w.nest(NFTA_LIST_ELEM);
    w.str(NFTA_EXPR_NAME, "cmp");
    let d = w.nest(NFTA_EXPR_DATA);
    w.u32(1, 1);
    w.nest_end(d);
    w.nest_end(n);
    assert_eq!(Expr::decode(attrs(&w.buf).next().unwrap().1), Expr::Unknown("cmp".into()));
    // Truncated bytes never panic.
    for cut in 0..w.buf.len() {
        let _ = Expr::decode(&w.buf[..cut]);
    }
}

/// The messages of a finished batch: (type, flags, seq, payload).
fn messages(bytes: &[u8]) -> Vec<(u16, u16, u32, Vec<u8>)> {
    let mut out = Vec::new();
    let mut rest = bytes;
    while rest.len() >= 16 {
        let len = u32::from_ne_bytes(rest[..4].try_into().unwrap()) as usize;
        let ty = u16::from_ne_bytes(rest[4..6].try_into().unwrap());
        let flags = u16::from_ne_bytes(rest[6..8].try_into().unwrap());
        let seq = u32::from_ne_bytes(rest[8..12].try_into().unwrap());
        out.push((ty, flags, seq, rest[16..len].to_vec()));
        rest = &rest[(len + 3) & !3..];
    }
    out
}

#[test]
fn a_batch_is_framed_and_acks_only_its_last_operation() {
    let mut b = Batch::new(NFPROTO_IPV4, "kube-proxy", 100);
    b.add_table("rules for kube-proxy");
    b.add_elements(
        "service-ips",
        &[Element {
            key: vec![10, 96, 0, 10, 6, 0, 0, 0, 0, 80, 0, 0],
            verdict: Some(Verdict::Goto("service-X".into())),
            ..Default::default()
        }],
    );
    b.flush_chain("service-X");
    assert_eq!((b.ops, b.first_seq), (3, 102));
    let (bytes, last) = b.finish();
    let m = messages(&bytes);
    let types: Vec<u16> = m.iter().map(|x| x.0).collect();
    let nft = |t: u16| (NFNL_SUBSYS_NFTABLES << 8) | t;
    assert_eq!(
        types,
        [
            NFNL_MSG_BATCH_BEGIN,
            nft(NFT_MSG_NEWTABLE),
            nft(NFT_MSG_NEWSETELEM),
            nft(NFT_MSG_DELRULE),
            NFNL_MSG_BATCH_END
        ]
    );
    let acked: Vec<u32> = m.iter().filter(|x| x.1 & 4 != 0).map(|x| x.2).collect();
    assert_eq!(acked, [last]);
    assert_eq!(last, 104);
    // Begin and end carry the subsystem in nfgenmsg's res_id.
    assert_eq!(&m[0].3[2..4], &NFNL_SUBSYS_NFTABLES.to_be_bytes());
}

#[test]
fn rules_with_anonymous_maps_create_the_map_first_and_decode_back() {
    let rule = Rule {
        chain: "service-X".into(),
        exprs: vec![
            Expr::Numgen { dreg: 1, modulus: 2, offset: 0 },
            Expr::Lookup {
                sreg: 1,
                set: SetRef::AnonVmap(vec![
                    (0, Verdict::Goto("endpoint-A".into())),
                    (1, Verdict::Goto("endpoint-B".into())),
                ]),
                dreg: Some(0),
                invert: false,
            },
        ],
        comment: Some("ns/svc:p".into()),
        handle: 0,
    };
    let mut b = Batch::new(NFPROTO_IPV4, "kube-proxy", 0);
    b.add_rule(&rule);
    let (bytes, _) = b.finish();
    let m = messages(&bytes);
    let nft = |t: u16| (NFNL_SUBSYS_NFTABLES << 8) | t;
    let types: Vec<u16> = m.iter().map(|x| x.0).collect();
    assert_eq!(types[1..4], [nft(NFT_MSG_NEWSET), nft(NFT_MSG_NEWSETELEM), nft(NFT_MSG_NEWRULE)]);
    let elems = objects::decode_elements(&m[2].3, "kube-proxy").unwrap();
    assert_eq!(elems.0, "__map%d");
    assert_eq!(
        elems.1[1],
        Element {
            key: 1u32.to_ne_bytes().to_vec(),
            verdict: Some(Verdict::Goto("endpoint-B".into())),
            ..Default::default()
        }
    );
    let back = objects::decode_rule(&m[3].3, "kube-proxy").unwrap();
    assert_eq!(back.chain, "service-X");
    assert_eq!(back.comment.as_deref(), Some("ns/svc:p"));
    assert_eq!(back.exprs[0], rule.exprs[0]);
    assert!(matches!(&back.exprs[1], Expr::Lookup { set: SetRef::Named(n), .. } if n == "__map%d"));
    assert!(objects::decode_rule(&m[3].3, "other").is_none(), "another table's rule");
}

#[test]
fn large_element_lists_are_split_into_messages_under_64k() {
    let elems: Vec<Element> = (0..5000u32)
        .map(|i| Element { key: i.to_be_bytes().to_vec(), verdict: Some(Verdict::Drop), ..Default::default() })
        .collect();
    let mut b = Batch::new(NFPROTO_IPV4, "kube-proxy", 0);
    b.add_elements("no-endpoint-services", &elems);
    let (bytes, _) = b.finish();
    let m = messages(&bytes);
    assert!(m.len() > 3);
    let mut total = 0;
    for msg in &m[1..m.len() - 1] {
        assert!(msg.3.len() < 65535);
        total += objects::decode_elements(&msg.3, "kube-proxy").unwrap().1.len();
    }
    assert_eq!(total, 5000);
}

#[test]
fn replies_split_into_frames() {
    // An error for seq 7 (EEXIST) followed by an ack for seq 8, as the kernel sends them.
    let mut d = Vec::new();
    for (seq, errno) in [(7u32, -17i32), (8, 0)] {
        d.extend_from_slice(&36u32.to_ne_bytes());
        d.extend_from_slice(&2u16.to_ne_bytes());
        d.extend_from_slice(&0u16.to_ne_bytes());
        d.extend_from_slice(&seq.to_ne_bytes());
        d.extend_from_slice(&0u32.to_ne_bytes());
        d.extend_from_slice(&errno.to_ne_bytes());
        d.extend_from_slice(&[0; 16]);
    }
    assert_eq!(frames(&d).unwrap(), [Frame::Error { seq: 7, errno: -17 }, Frame::Error { seq: 8, errno: 0 }]);
    assert!(frames(&d[..20]).is_err());
}
