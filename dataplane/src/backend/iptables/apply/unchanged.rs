//! Which per-service chains a full sync can leave as they are.
//!
//! A full sync reads `iptables-save -t nat` anyway. A per-service chain (KUBE-SVC-*, KUBE-SEP-*,
//! ...) whose rules in the kernel are exactly the rules kpx would write needs no rewrite, and
//! on iptables-nft rewriting an existing chain is what makes a resync of a loaded ruleset slow
//! (each declaration first deletes the chain's old rules). The top-level chains are rewritten
//! as before; only the per-service chains are compared.
//!
//! The comparison is rule by rule, in order, and any doubt means "rewrite": the result can only
//! cost a rewrite, never leave a wrong rule. A rendered rule and a saved rule are the same when
//! their text is equal, or else when their canonical token lists are equal. iptables-save
//! (1.8.9, nft and legacy alike) prints kpx's rules back in the order they were written, and
//! differs from the rendered text in exactly three ways (measured, see the tests):
//!
//! - **Quoting.** A comment made only of `[A-Za-z0-9_-]` is printed without quotes. Both sides
//!   are split into arguments the way iptables-restore's tokenizer does (a double quote
//!   toggles quoting and is dropped), so `"abc"` and `abc` are the same argument. A backslash
//!   anywhere stops the comparison (no match): kpx never writes one.
//! - **`--probability`.** The statistic match stores `round(p * 2^31)` and prints it back with
//!   11 decimals (`0.3333333333` comes back as `0.33333333349`). Both values are compared as
//!   that stored integer, which is what the kernel holds.
//! - **`-m recent`.** Its options come back in the tool's own order (`--rcheck --seconds 10800
//!   --reap --name X`), followed by the defaults kpx leaves out (`--mask` all ones,
//!   `--rsource`). Within a recent match the options are compared as a sorted list, with an
//!   all-ones mask and `--rsource` dropped. An option it does not know (or `!`) means no match.

use std::collections::{HashMap, HashSet};

use crate::backend::iptables::ruleset::{stored_probability, tokenize};
use crate::backend::iptables::saved::{SERVICE_CHAIN_PREFIXES, SavedTable};

fn is_service_chain(chain: &str) -> bool {
    SERVICE_CHAIN_PREFIXES.iter().any(|p| chain.starts_with(p))
}

/// The per-service chains of a restore's `*nat` section that need no rewrite.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Unchanged {
    pub chains: HashSet<String>,
    /// Their rules (what the restore no longer writes).
    pub rules: usize,
    /// The rules of all the per-service chains rendered, unchanged or not.
    pub rendered_rules: usize,
}

/// The per-service chains declared in `nat` (the `*nat` section of `render_full`'s output)
/// that `saved` (`iptables-save -t nat`) holds with the same rules in the same order.
pub fn unchanged_chains(nat: &str, saved: &SavedTable) -> Unchanged {
    let mut rendered: HashMap<&str, Vec<&str>> = HashMap::new();
    for line in nat.lines() {
        if let Some(decl) = line.strip_prefix(':') {
            if let Some(chain) = decl.split_whitespace().next().filter(|c| is_service_chain(c)) {
                rendered.entry(chain).or_default();
            }
        } else if let Some(rule) = line.strip_prefix("-A ") {
            let (chain, rest) = rule.split_once(' ').unwrap_or((rule, ""));
            if is_service_chain(chain) {
                rendered.entry(chain).or_default().push(rest);
            }
        }
    }
    let mut in_kernel: HashMap<&str, Vec<&str>> = HashMap::new();
    for (chain, rest) in &saved.rules {
        if rendered.contains_key(chain.as_str()) {
            in_kernel.entry(chain).or_default().push(rest);
        }
    }
    let mut out = Unchanged { rendered_rules: rendered.values().map(Vec::len).sum(), ..Unchanged::default() };
    for (chain, want) in rendered {
        if !saved.chains.contains(chain) {
            continue;
        }
        let have = in_kernel.get(chain).map(Vec::as_slice).unwrap_or_default();
        if have.len() == want.len() && want.iter().zip(have).all(|(w, h)| same_rule(w, h)) {
            out.rules += want.len();
            out.chains.insert(chain.to_string());
        }
    }
    out
}

/// Whether a rendered rule and a rule as iptables-save printed it (both without "-A CHAIN ")
/// are the same rule (see the module comment). `false` whenever in doubt.
pub fn same_rule(rendered: &str, saved: &str) -> bool {
    if rendered == saved {
        return true;
    }
    if let Some(same) = same_but_probability(rendered, saved) {
        return same;
    }
    matches!((canonical(rendered), canonical(saved)), (Some(a), Some(b)) if a == b)
}

/// The usual difference, decided without tokenizing: the text is equal but for the value of
/// one `--probability` option outside quotes. None when the rules are not of that shape.
fn same_but_probability(rendered: &str, saved: &str) -> Option<bool> {
    const OPT: &str = " --probability ";
    let (rh, rt) = rendered.split_once(OPT)?;
    let (sh, st) = saved.split_once(OPT)?;
    let outside_quotes = |head: &str| !head.contains('\\') && head.matches('"').count().is_multiple_of(2);
    if rh != sh || !outside_quotes(rh) {
        return None;
    }
    let (rp, rtail) = rt.split_once(' ').unwrap_or((rt, ""));
    let (sp, stail) = st.split_once(' ').unwrap_or((st, ""));
    if rtail != stail || rtail.contains(OPT.trim_start()) {
        return None;
    }
    Some(stored_probability(rp)?.eq(&stored_probability(sp)?))
}

const FULL_MASKS: [&str; 2] = ["255.255.255.255", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"];

/// The canonical argument list of a rule, or None when it has something this comparison does
/// not understand well enough.
fn canonical(rule: &str) -> Option<Vec<String>> {
    let toks = tokenize(rule)?;
    let mut out = Vec::with_capacity(toks.len() + 4);
    let mut it = toks.into_iter().peekable();
    while let Some(t) = it.next() {
        match t.as_str() {
            // A comment's text is one argument, whatever it looks like.
            "--comment" => {
                let text = it.next()?;
                out.push(t);
                out.push(text);
            }
            "--probability" => {
                let p = stored_probability(&it.next()?)?;
                out.push(t);
                out.push(format!("{p}/2^31"));
            }
            "-m" if it.peek().is_some_and(|m| m == "recent") => {
                out.push(t);
                out.push(it.next()?);
                let mut opts: Vec<(String, Option<String>)> = Vec::new();
                while let Some(o) = it.next_if(|o| o != "-m" && o != "-j" && o != "-g") {
                    match o.as_str() {
                        "--set" | "--rcheck" | "--update" | "--remove" | "--reap" | "--rttl" | "--rdest" => {
                            opts.push((o, None))
                        }
                        "--rsource" => {}
                        "--name" | "--seconds" | "--hitcount" | "--mask" => {
                            let v = it.next()?;
                            if !(o == "--mask" && FULL_MASKS.contains(&v.as_str())) {
                                opts.push((o, Some(v)));
                            }
                        }
                        _ => return None,
                    }
                }
                opts.sort();
                for (o, v) in opts {
                    out.push(o);
                    out.extend(v);
                }
            }
            _ => out.push(t),
        }
    }
    Some(out)
}

/// `restore` without the declarations and rules of the chains in `skip`.
pub fn without_chains(restore: &str, skip: &HashSet<String>) -> String {
    let mut out = String::with_capacity(restore.len());
    for line in restore.lines() {
        let chain = line.strip_prefix(':').or_else(|| line.strip_prefix("-A ")).and_then(|r| r.split(' ').next());
        if !chain.is_some_and(|c| skip.contains(c)) {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}
