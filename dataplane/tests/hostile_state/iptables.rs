//! The iptables tools in a network namespace: which variants run here, running their restore
//! and save commands, and parsing what iptables-save prints.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::process::{Command, Stdio};

use kpx_dataplane::backend::iptables::IptablesConfig;
use kpx_dataplane::backend::iptables::render::{IpFamily, RenderConfig};

use crate::netns::{self, NetNs};

fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// The iptables variants ("nft", "legacy") whose v4 and v6 restore and save tools run here.
/// Without root and network namespaces: none (a loud skip; a panic under CI=true). A variant
/// with a missing tool is skipped loudly, or fails the test under CI=true.
pub(crate) fn variants(test: &str) -> Vec<&'static str> {
    if !netns::require_root_and_netns() {
        return Vec::new();
    }
    let mut out = Vec::new();
    for v in ["nft", "legacy"] {
        let missing: Vec<String> = ["iptables", "ip6tables"]
            .iter()
            .flat_map(|t| [format!("{t}-{v}-restore"), format!("{t}-{v}-save")])
            .filter(|t| {
                !Command::new(t).arg("--version").stdin(Stdio::null()).output().is_ok_and(|o| o.status.success())
            })
            .collect();
        if missing.is_empty() {
            out.push(v);
        } else if ci() {
            panic!("{test}: CI=true and the iptables-{v} tools cannot run: {missing:?} missing");
        } else {
            let _ = writeln!(std::io::stderr(), "\n*** SKIPPED {test} for iptables-{v}: {missing:?} missing ***\n");
        }
    }
    out
}

/// One iptables variant for one family.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Tools {
    pub(crate) family: IpFamily,
    pub(crate) variant: &'static str,
}

impl Tools {
    fn prefix(&self) -> &'static str {
        match self.family {
            IpFamily::V4 => "iptables",
            IpFamily::V6 => "ip6tables",
        }
    }

    pub(crate) fn restore(&self) -> String {
        format!("{}-{}-restore", self.prefix(), self.variant)
    }

    pub(crate) fn save(&self) -> String {
        format!("{}-{}-save", self.prefix(), self.variant)
    }

    pub(crate) fn name(&self) -> String {
        format!("{}-{}", self.prefix(), self.variant)
    }
}

/// Runs `argv` in `ns` with `input` on stdin; its stdout, or why it failed.
fn run_stdin(ns: &NetNs, argv: &[&str], input: &str) -> Result<String, String> {
    let mut cmd = ns.command(argv);
    cmd.env("LC_ALL", "C").stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| format!("spawn {argv:?}: {e}"))?;
    let out = std::thread::scope(|s| {
        if let Some(mut pipe) = child.stdin.take() {
            s.spawn(move || {
                let _ = pipe.write_all(input.as_bytes());
            });
        }
        child.wait_with_output()
    })
    .map_err(|e| format!("wait for {argv:?}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!("{argv:?} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim()))
    }
}

/// `input` restored with the extra `args` ("--test", "--noflush"); on failure, the error with
/// the input line it names.
pub(crate) fn restore(ns: &NetNs, tools: Tools, args: &[&str], input: &str) -> Result<(), String> {
    let cmd = tools.restore();
    let mut argv = vec![cmd.as_str()];
    argv.extend_from_slice(args);
    run_stdin(ns, &argv, input).map(|_| ()).map_err(|e| {
        let line = e
            .split("line ")
            .nth(1)
            .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|n| n.parse::<usize>().ok())
            .and_then(|n| input.lines().nth(n.saturating_sub(1)));
        match line {
            Some(l) => format!("{e}\n  offending line: {l:?}"),
            None => e,
        }
    })
}

/// chain -> rules (each without "-A CHAIN "), per table.
pub(crate) type Tables = BTreeMap<String, BTreeMap<String, Vec<String>>>;

pub(crate) const BUILTIN: [&str; 5] = ["INPUT", "FORWARD", "OUTPUT", "PREROUTING", "POSTROUTING"];

/// `iptables-save` of filter and nat, parsed. Any line that is not a table, chain, rule,
/// COMMIT or comment (a rule split by a newline, say) is an error.
pub(crate) fn save(ns: &NetNs, tools: Tools) -> Result<(String, Tables), String> {
    let save = tools.save();
    let mut text = String::new();
    for t in ["filter", "nat"] {
        text.push_str(&run_stdin(ns, &[&save, "-t", t], "")?);
    }
    let tables = parse_save(&text)?;
    Ok((text, tables))
}

fn parse_save(text: &str) -> Result<Tables, String> {
    let mut tables = Tables::new();
    let mut table = String::new();
    for line in text.lines() {
        if line.starts_with('#') || line == "COMMIT" {
            continue;
        }
        if let Some(t) = line.strip_prefix('*') {
            table = t.to_string();
            tables.entry(table.clone()).or_default();
        } else if let Some(decl) = line.strip_prefix(':') {
            let chain = decl.split(' ').next().unwrap_or_default();
            tables.entry(table.clone()).or_default().entry(chain.to_string()).or_default();
        } else if let Some(rule) = line.strip_prefix("-A ") {
            let (chain, rest) = rule.split_once(' ').unwrap_or((rule, ""));
            tables.entry(table.clone()).or_default().entry(chain.to_string()).or_default().push(rest.to_string());
        } else {
            return Err(format!("iptables-save printed a line that is no rule: {line:?}"));
        }
    }
    Ok(tables)
}

/// Splits a rule into arguments as iptables-restore does (blanks separate, double quotes
/// group); None for an unbalanced quote. Written apart from the backend's own tokenizer
/// (`apply/unchanged.rs`) on purpose: a check must not share the code it checks.
pub(crate) fn tokens(rule: &str) -> Option<Vec<String>> {
    let (mut out, mut cur, mut quoted, mut started) = (Vec::new(), String::new(), false, false);
    for c in rule.chars() {
        match c {
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

pub(crate) fn arg<'a>(toks: &'a [String], opt: &str) -> Option<&'a str> {
    toks.iter().position(|t| t == opt).and_then(|i| toks.get(i + 1)).map(String::as_str)
}

/// The comment of every rule line (`-A`/`-I`) of a restore input or of iptables-save output.
pub(crate) fn comments(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| l.starts_with("-A ") || l.starts_with("-I "))
        .filter_map(tokens)
        .filter_map(|t| arg(&t, "--comment").map(String::from))
        .collect()
}

/// A backend for `tools` in `ns` that renders as `r` does.
pub(crate) fn backend_cfg(ns: &NetNs, tools: Tools, r: RenderConfig) -> IptablesConfig {
    let mut cfg = IptablesConfig::new(tools.family, &r.node_name);
    cfg.restore_cmd = tools.restore();
    cfg.save_cmd = tools.save();
    cfg.cluster_cidr = r.cluster_cidr;
    cfg.masquerade_all = r.masquerade_all;
    cfg.node_ips = r.node_ips;
    cfg.localhost_node_ports = r.localhost_node_ports;
    cfg.netns = Some(ns.name().to_string());
    cfg
}
