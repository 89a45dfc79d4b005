//! The canonical form of one rule: the same token list for every spelling that leaves the same
//! rule in the kernel, measured against iptables 1.8.9 (nft and legacy print alike):
//!
//! - **Quoting.** Arguments are split as iptables-restore splits them (a double quote toggles
//!   quoting and is dropped): `"abc"` and `abc` are one argument.
//! - **Order.** iptables-save prints the address, interface and protocol options first
//!   (`! -s`, `-d`, `-i`, `-o`, `-p`), then the matches in the order they were given, then the
//!   target; long option names (`--source`, `--dst`, ...) become the short ones. Addresses
//!   become prefixes with their host bits cleared (`10.0.0.1` is `10.0.0.1/32`).
//! - **Match options.** `--probability P` is compared as the integer the statistic match
//!   stores (round(P * 2^31)); `-m recent` options are sorted, without the defaults
//!   (`--rsource`, an all-ones `--mask`); `--ctstate`/`--state` lists are sorted; marks are
//!   hexadecimal numbers (`0x00004000` is `0x4000`); `--destination-port`/`--source-port` are
//!   `--dport`/`--sport`.
//! - **Targets.** MARK's `--or-mark`, `--xor-mark`, `--and-mark`, `--set-mark` and a mask-less
//!   `--set-xmark` are the `--set-xmark VALUE/MASK` the kernel stores; REJECT's default
//!   `--reject-with icmp-port-unreachable` (icmp6 for IPv6) is left out.
//!
//! Text that does not tokenize (a backslash, an unbalanced quote) stays one opaque token, so it
//! only ever equals the same text.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Splits a rule into arguments as iptables-restore does: on blanks, with double quotes
/// grouping (and dropped). None for a backslash or an unbalanced quote.
pub fn tokenize(rule: &str) -> Option<Vec<String>> {
    let (mut out, mut cur, mut quoted, mut started) = (Vec::new(), String::new(), false, false);
    for c in rule.chars() {
        match c {
            '\\' => return None,
            '"' => {
                quoted = !quoted;
                started = true;
            }
            ' ' | '\t' if !quoted => {
                if started {
                    out.push(std::mem::take(&mut cur));
                    started = false;
                }
            }
            c => {
                cur.push(c);
                started = true;
            }
        }
    }
    if quoted {
        return None;
    }
    if started {
        out.push(cur);
    }
    Some(out)
}

/// `--probability P` as the statistic match stores it: round(P * 2^31).
pub fn stored_probability(p: &str) -> Option<u64> {
    let p: f64 = p.parse().ok()?;
    (0.0..=1.0).contains(&p).then(|| (p * 2_147_483_648.0).round() as u64)
}

const FULL_MASKS: [&str; 2] = ["255.255.255.255", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"];

/// The base options in the order iptables-save prints them, with their long names.
const BASE: [(&str, &[&str]); 5] = [
    ("-s", &["-s", "--source", "--src"]),
    ("-d", &["-d", "--destination", "--dst"]),
    ("-i", &["-i", "--in-interface"]),
    ("-o", &["-o", "--out-interface"]),
    ("-p", &["-p", "--protocol"]),
];

fn base_index(tok: &str) -> Option<usize> {
    BASE.iter().position(|(_, names)| names.contains(&tok))
}

/// The canonical token list of a rule (the text after `-A CHAIN `); see the module comment.
pub fn canonical(rule: &str) -> Vec<String> {
    let Some(toks) = tokenize(rule) else { return vec![format!("(untokenized) {rule}")] };
    let mut base: [Option<(bool, String)>; 5] = Default::default();
    // Tokens before the first match that are not base options (kept in place).
    let mut loose: Vec<String> = Vec::new();
    let mut groups: Vec<Vec<String>> = Vec::new();
    let mut target: Vec<String> = Vec::new();
    let mut i = 0;
    while i < toks.len() {
        let t = toks[i].as_str();
        let negated_base = t == "!" && toks.get(i + 1).is_some_and(|n| base_index(n).is_some());
        let (neg, t) = if negated_base {
            i += 1;
            (true, toks[i].as_str())
        } else {
            (false, t)
        };
        if let Some(b) = base_index(t) {
            let value = toks.get(i + 1).cloned().unwrap_or_default();
            let value = match b {
                0 | 1 => prefix(&value),
                4 => value.to_ascii_lowercase(),
                _ => value,
            };
            base[b] = Some((neg, value));
            i += 2;
        } else if t == "-m" || t == "--match" {
            groups.push(vec!["-m".into(), toks.get(i + 1).cloned().unwrap_or_default()]);
            i += 2;
        } else if t == "-j" || t == "--jump" || t == "-g" || t == "--goto" {
            let flag = if t.starts_with("-j") || t == "--jump" { "-j" } else { "-g" };
            target.push(flag.into());
            target.extend(toks[i + 1..].iter().cloned());
            break;
        } else {
            match groups.last_mut() {
                Some(g) => g.push(t.to_string()),
                None => loose.push(t.to_string()),
            }
            i += 1;
        }
    }
    let mut out = Vec::with_capacity(toks.len() + 4);
    for (b, v) in base.iter().enumerate() {
        if let Some((neg, value)) = v {
            if *neg {
                out.push("!".to_string());
            }
            out.push(BASE[b].0.to_string());
            out.push(value.clone());
        }
    }
    out.extend(loose);
    for g in groups {
        out.extend(match_group(g));
    }
    out.extend(target_options(target));
    out
}

/// An address or prefix as the kernel keeps it: `ADDR/LEN` with the host bits cleared.
fn prefix(s: &str) -> String {
    let (a, len) = match s.split_once('/') {
        Some((a, l)) => (a, Some(l)),
        None => (s, None),
    };
    let Ok(addr) = a.parse::<IpAddr>() else { return s.to_string() };
    let max: u32 = if addr.is_ipv4() { 32 } else { 128 };
    let len: u32 = match len {
        None => max,
        Some(l) => match l.parse() {
            Ok(l) if l <= max => l,
            _ => return s.to_string(),
        },
    };
    let net = match addr {
        IpAddr::V4(v) => IpAddr::from(Ipv4Addr::from(u32::from(v) & u32::MAX.checked_shl(32 - len).unwrap_or(0))),
        IpAddr::V6(v) => IpAddr::from(Ipv6Addr::from(u128::from(v) & u128::MAX.checked_shl(128 - len).unwrap_or(0))),
    };
    format!("{net}/{len}")
}

/// A number as iptables prints marks: lower-case hexadecimal.
fn hex(s: &str) -> Option<u32> {
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(h) => u32::from_str_radix(h, 16).ok(),
        None => s.parse().ok(),
    }
}

/// `VALUE[/MASK]` in hexadecimal, the mask defaulting to all ones; None when not numbers.
fn value_mask(s: &str) -> Option<(u32, u32)> {
    match s.split_once('/') {
        Some((v, m)) => Some((hex(v)?, hex(m)?)),
        None => Some((hex(s)?, u32::MAX)),
    }
}

fn match_group(g: Vec<String>) -> Vec<String> {
    let name = g.get(1).cloned().unwrap_or_default();
    let mut out: Vec<String> = g[..2.min(g.len())].to_vec();
    let mut it = g.into_iter().skip(2).peekable();
    match name.as_str() {
        "recent" => {
            let mut opts: Vec<String> = Vec::new();
            let mut neg = false;
            while let Some(o) = it.next() {
                match o.as_str() {
                    "!" => neg = true,
                    "--rsource" => {}
                    "--name" | "--seconds" | "--hitcount" | "--mask" => {
                        let v = it.next().unwrap_or_default();
                        if !(o == "--mask" && FULL_MASKS.contains(&v.as_str())) {
                            opts.push(format!("{}{o} {v}", if neg { "! " } else { "" }));
                        }
                        neg = false;
                    }
                    _ => {
                        opts.push(format!("{}{o}", if neg { "! " } else { "" }));
                        neg = false;
                    }
                }
            }
            opts.sort();
            out.extend(opts);
        }
        _ => {
            while let Some(o) = it.next() {
                let o = match o.as_str() {
                    "--destination-port" => "--dport".to_string(),
                    "--source-port" => "--sport".to_string(),
                    _ => o,
                };
                let value = |v: Option<String>| v.unwrap_or_default();
                match o.as_str() {
                    "--probability" => {
                        let v = value(it.next());
                        out.push(o);
                        out.push(stored_probability(&v).map_or(v, |p| format!("{p}/2^31")));
                    }
                    "--ctstate" | "--state" => {
                        let v = value(it.next());
                        let mut states: Vec<&str> = v.split(',').collect();
                        states.sort_unstable();
                        out.push(o);
                        out.push(states.join(","));
                    }
                    "--mark" if name == "mark" => {
                        let v = value(it.next());
                        out.push(o);
                        out.push(value_mask(&v).map_or(v, |(v, m)| format!("{v:#x}/{m:#x}")));
                    }
                    _ => out.push(o),
                }
            }
        }
    }
    out
}

fn target_options(target: Vec<String>) -> Vec<String> {
    if target.len() < 2 || target[0] != "-j" {
        return target;
    }
    match target[1].as_str() {
        "MARK" => {
            let mut out = vec!["-j".to_string(), "MARK".to_string()];
            let mut it = target.into_iter().skip(2);
            while let Some(o) = it.next() {
                let v = it.next().unwrap_or_default();
                let xmark = match (o.as_str(), value_mask(&v)) {
                    ("--set-xmark", Some((v, m))) => Some((v, m)),
                    ("--set-mark", Some((v, m))) => Some((v, m | v)),
                    ("--or-mark", Some((v, _))) => Some((v, v)),
                    ("--and-mark", Some((v, _))) => Some((0, !v)),
                    ("--xor-mark", Some((v, _))) => Some((v, 0)),
                    _ => None,
                };
                match xmark {
                    Some((v, m)) => out.extend(["--set-xmark".to_string(), format!("{v:#x}/{m:#x}")]),
                    None => out.extend([o, v]),
                }
            }
            out
        }
        "REJECT" => {
            let defaults = ["icmp-port-unreachable", "icmp6-port-unreachable"];
            let mut out = Vec::new();
            let mut it = target.into_iter().peekable();
            while let Some(t) = it.next() {
                if t == "--reject-with" && it.peek().is_some_and(|v| defaults.contains(&v.as_str())) {
                    it.next();
                    continue;
                }
                out.push(t);
            }
            out
        }
        _ => target,
    }
}
