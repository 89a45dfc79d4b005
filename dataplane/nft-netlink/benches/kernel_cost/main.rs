//! Where nf_tables spends its time on kube-proxy-shaped tables: builds a table of N services
//! (E endpoint chains each) in one of several shapes, times the one transaction that creates it,
//! then times small transactions on top of it (an endpoint chain, a map element, a service
//! chain's rule). Comparing sizes shows what grows with the table; comparing shapes shows which
//! object is to blame. Run it under `perf record -g` to see the kernel functions.
//!
//! `cargo bench -p kpx-nft-netlink --bench kernel_cost -- --sizes 1000,10000 --shapes anon,named,ranges,compact`
//! (as root; `--endpoints E` per service, `--chunk N` services per transaction, `--buckets B` maps
//! for the `ranges` shape, `--floor C1,C2` the cost of a one-element transaction in a table of C
//! chains). Prints figures; asserts nothing. Without `--bench` it only builds a batch.
//! docs/nftables.md has the findings.

mod shapes;

use std::process::Command;
use std::time::{Duration, Instant};

use kpx_nft_netlink::consts::*;
use kpx_nft_netlink::{Batch, Chain, Element, Expr, NftClient, Verdict};
use shapes::*;

struct Ns(String);

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1e3)
}

/// Times `build`'s transaction `rounds` times (each followed by `undo`'s, untimed).
fn probe(c: &mut NftClient, rounds: usize, build: &dyn Fn(&mut Batch), undo: &dyn Fn(&mut Batch)) -> Duration {
    let mut t = Vec::new();
    for _ in 0..rounds {
        let mut b = c.batch(NFPROTO_IPV4, TABLE);
        build(&mut b);
        let s = Instant::now();
        c.commit(b).expect("probe transaction");
        t.push(s.elapsed());
        let mut b = c.batch(NFPROTO_IPV4, TABLE);
        undo(&mut b);
        c.commit(b).expect("undo transaction");
    }
    median(t)
}

fn run(shape: Shape, n: usize, e: usize, chunk: usize) {
    // The endpoint-add probe needs `lb-(E+1)`.
    assert!(shape != Shape::Compact || e < COMPACT_MAX, "--shapes compact takes --endpoints below {COMPACT_MAX}");
    let ns = Ns(format!("kpxcost-{}", std::process::id()));
    assert!(
        Command::new("ip").args(["netns", "add", &ns.0]).status().is_ok_and(|s| s.success()),
        "ip netns add (root)"
    );
    let mut c = NftClient::in_netns(&ns.0).expect("nf_tables");
    let mut b = c.batch(NFPROTO_IPV4, TABLE);
    base(&mut b, shape);
    c.commit(b).expect("base");
    let (mut full, mut bytes) = (Duration::ZERO, 0);
    for start in (0..n).step_by(chunk.max(1)) {
        let mut b = c.batch(NFPROTO_IPV4, TABLE);
        for i in start..(start + chunk).min(n) {
            service(&mut b, shape, i, e, false);
        }
        if shape == Shape::Ranges {
            for i in start..(start + chunk).min(n) {
                b.add_elements(&bucket(i).0, &ranges(i, e, false));
            }
        }
        let s = Instant::now();
        c.commit(b).expect("services");
        full += s.elapsed();
        bytes += c.stats.last_bytes;
    }
    let target = n / 2;
    let new_ep = |b: &mut Batch| endpoint(b, target, 200, true);
    let new_ep_nojump = |b: &mut Batch| endpoint(b, target, 200, false);
    let del_ep = |b: &mut Batch| {
        b.flush_chain(&ep_chain(target, 200));
        b.del_chain(&ep_chain(target, 200));
    };
    let r = 15;
    let chain_jump = probe(&mut c, r, &new_ep, &del_ep);
    let chain_plain = probe(&mut c, r, &new_ep_nojump, &del_ep);
    let key = |x: u8| [vec![192, 0, 2, x], vec![6, 0, 0, 0, 0, 80, 0, 0]].concat();
    let goto_elem =
        vec![Element { key: key(1), verdict: Some(Verdict::Goto(svc_chain(target))), ..Default::default() }];
    let drop_elem = vec![Element { key: key(2), verdict: Some(Verdict::Drop), ..Default::default() }];
    // A compact table has no service chain to go to, nor rules to rewrite: those print "-".
    let compact = shape == Shape::Compact;
    let elem_goto = (!compact).then(|| {
        probe(&mut c, r, &|b| b.add_elements("service-ips", &goto_elem), &|b| b.del_elements("service-ips", &goto_elem))
    });
    let elem_drop = probe(&mut c, r, &|b| b.add_elements("service-ips", &drop_elem), &|b| {
        b.del_elements("service-ips", &drop_elem)
    });
    let plain = vec![Element { key: vec![192, 0, 2, 3], verdict: None, ..Default::default() }];
    let elem_plain =
        probe(&mut c, r, &|b| b.add_elements("cluster-ips", &plain), &|b| b.del_elements("cluster-ips", &plain));
    let rewrite = |b: &mut Batch| {
        b.flush_chain(&svc_chain(target));
        for r in picks(shape, target, e) {
            b.add_rule(&rule(&svc_chain(target), r));
        }
    };
    let rule_rewrite = (!compact).then(|| probe(&mut c, r, &rewrite, &|_| {}));
    if compact {
        // What `nft list` makes of the compact table's rules (nft reads them back itself).
        for chain in ["services", "lb-10"] {
            let out =
                Command::new("ip").args(["netns", "exec", &ns.0, "nft", "list", "chain", "ip", TABLE, chain]).output();
            if let Ok(o) = out {
                print!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
            }
        }
    }
    let ep_add = probe(&mut c, r, &|b| endpoint_change(b, shape, target, e, e + 1), &|b| {
        endpoint_change(b, shape, target, e + 1, e)
    });
    let ep_del = probe(&mut c, r, &|b| endpoint_change(b, shape, target, e, e - 1), &|b| {
        endpoint_change(b, shape, target, e - 1, e)
    });
    let svc_add = probe(&mut c, r, &|b| service(b, shape, n + 7, e, true), &|b| remove_service(b, shape, n + 7, e));
    let mut b = c.batch(NFPROTO_IPV4, TABLE);
    endpoint_change(&mut b, shape, target, e, e + 1);
    let ep_bytes = b.len();
    let generation = c.gen_id().expect("generation");
    let s = Instant::now();
    let _ = c.gen_id();
    let gen_t = s.elapsed();
    println!(
        "{shape:?} {n} services x {e} endpoints (chunks of {chunk}): full {:.3} s, {:.1} MB | +chain with jump {} | +chain without jump {} | +element goto {} | +element drop {} | +plain set element {} | service rule rewrite {} | getgen {} (gen {generation}) | ENDPOINT ADD {} / REMOVE {} ({ep_bytes} B) | SERVICE ADD {}",
        full.as_secs_f64(),
        bytes as f64 / 1e6,
        ms(chain_jump),
        ms(chain_plain),
        elem_goto.map_or("-".into(), ms),
        ms(elem_drop),
        ms(elem_plain),
        rule_rewrite.map_or("-".into(), ms),
        ms(gen_t),
        ms(ep_add),
        ms(ep_del),
        ms(svc_add),
    );
}

/// The cost of a commit that changes one plain element, as a function of how many chains (with
/// one rule each, none reachable) the table has: what every transaction pays whatever it holds.
fn floor(chains: usize) {
    let ns = Ns(format!("kpxfloor-{}", std::process::id()));
    assert!(
        Command::new("ip").args(["netns", "add", &ns.0]).status().is_ok_and(|s| s.success()),
        "ip netns add (root)"
    );
    let mut c = NftClient::in_netns(&ns.0).expect("nf_tables");
    let mut b = c.batch(NFPROTO_IPV4, TABLE);
    base(&mut b, Shape::Flat);
    for i in 0..chains {
        let name = format!("chain-{i}");
        b.add_chain(&Chain { name: name.clone(), hook: None });
        b.add_rule(&rule(&name, vec![Expr::Meta { key: 16, dreg: 1 }, Expr::Cmp { sreg: 1, op: 0, data: vec![6] }]));
    }
    c.commit(b).expect("chains");
    let plain = vec![Element { key: vec![192, 0, 2, 3], verdict: None, ..Default::default() }];
    let t = probe(&mut c, 31, &|b| b.add_elements("cluster-ips", &plain), &|b| b.del_elements("cluster-ips", &plain));
    println!("{chains} chains: a one-element transaction {}", ms(t));
}

fn main() {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let (mut sizes, mut shapes, mut e, mut chunk) = (vec![1000], vec![Shape::Anon], 10, usize::MAX);
    let mut it = argv.iter();
    while let Some(f) = it.next() {
        let mut v = || it.next().unwrap_or_else(|| panic!("{f} needs a value")).clone();
        match f.as_str() {
            "--sizes" => sizes = v().split(',').map(|s| s.parse().expect("--sizes N,M")).collect(),
            "--shapes" => shapes = v().split(',').map(Shape::parse).collect(),
            "--endpoints" => e = v().parse().expect("--endpoints E"),
            "--chunk" => chunk = v().parse().expect("--chunk N"),
            "--buckets" => BUCKETS.store(v().parse().expect("--buckets N"), std::sync::atomic::Ordering::Relaxed),
            "--floor" => {
                v().split(',').for_each(|n| floor(n.parse().expect("--floor N,M")));
                return;
            }
            _ => {}
        }
    }
    if !argv.iter().any(|a| a == "--bench") {
        let mut b = Batch::new(NFPROTO_IPV4, TABLE, 0);
        base(&mut b, Shape::Anon);
        service(&mut b, Shape::Anon, 0, 3, true);
        println!("smoke: one service is {} operations (run with --bench for figures)", b.ops);
        return;
    }
    for &n in &sizes {
        for &shape in &shapes {
            run(shape, n, e, chunk.min(n));
        }
    }
}
