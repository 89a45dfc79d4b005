//! A restore input's rules in the order `iptables-save` prints them: grouped by chain, the
//! chains in name order.
//!
//! Why: iptables-legacy-restore (libiptc) finds the chain of every `-A` line by a binary search
//! over a sparse index of its name-sorted chain list, then a walk along that list. Rules that
//! come chain after chain in name order keep that walk in the CPU cache; in kpx's rendering
//! order (services by key, their chains named by hashes) every chain's first rule walks cold
//! memory. Measured at 10k services / 100k endpoints in a fresh namespace: the same rules
//! restored in about 10% less user time in this order than as rendered, on top of what
//! declaring the chains in name order saved (`render_full`; figures in docs/performance.md,
//! "Agent memory and cold start").
//! Reordering costs one pass over the input and a sort of its chains (tens of ms at that size).

use std::ops::Range;

/// The order to write `text` (iptables-restore input, found at `offset` in a larger buffer) in,
/// as ranges of that buffer: every run of `-A` lines regrouped, each chain's lines together
/// and in their own order, the chains in name order. Any other line (a table header, a
/// declaration, `-I`, `-D`, `-X`, `COMMIT`) stays where it is and bounds the regrouping, so
/// the ranges restore exactly the same rules. Ranges rather than a reordered copy: the agent
/// holds one copy of a ruleset of tens of MiB, not two.
pub fn in_chain_order(text: &str, offset: usize) -> Vec<Range<usize>> {
    let mut order: Vec<Range<usize>> = Vec::new();
    let mut emit = |r: Range<usize>| match order.last_mut() {
        Some(last) if last.end == r.start => last.end = r.end,
        _ => order.push(r),
    };
    // (chain, range): consecutive lines of one chain.
    let mut runs: Vec<(&str, Range<usize>)> = Vec::new();
    let flush = |runs: &mut Vec<(&str, Range<usize>)>, emit: &mut dyn FnMut(Range<usize>)| {
        runs.sort_by(|a, b| a.0.cmp(b.0)); // stable: a chain seen twice keeps its order
        runs.drain(..).for_each(|(_, r)| emit(r));
    };
    let mut pos = offset;
    for line in text.split_inclusive('\n') {
        let range = pos..pos + line.len();
        pos = range.end;
        // (A last line without its newline stays last: moved, it would join the next line.)
        let append = line.ends_with('\n').then(|| line.strip_prefix("-A ")).flatten();
        match append.and_then(|rest| rest.split([' ', '\n']).next()) {
            Some(chain) => match runs.last_mut() {
                Some(run) if run.0 == chain => run.1.end = range.end,
                _ => runs.push((chain, range)),
            },
            None => {
                flush(&mut runs, &mut emit);
                emit(range);
            }
        }
    }
    flush(&mut runs, &mut emit);
    order
}

#[cfg(test)]
mod tests {
    use super::in_chain_order;

    fn rules_in_chain_order(text: &str) -> String {
        in_chain_order(text, 0).into_iter().map(|r| &text[r]).collect()
    }

    #[test]
    fn ranges_are_of_the_larger_buffer_and_merge_when_adjacent() {
        let buf = "*filter\nCOMMIT\n*nat\n:A - [0:0]\n-A A -j RETURN\n-A A -j DROP\nCOMMIT\n";
        let nat = buf.find("*nat").unwrap();
        let ranges = in_chain_order(&buf[nat..], nat);
        // Already in order: one range, the whole section.
        assert_eq!(ranges, vec![nat..buf.len()]);
    }

    #[test]
    fn groups_rules_by_chain_in_name_order_keeping_each_chains_order() {
        let input = "*nat\n:B - [0:0]\n:A - [0:0]\n:C - [0:0]\n\
                     -A C -j RETURN\n-A B -m comment --comment one -j C\n-A B -j A\n-A A -j RETURN\n\
                     -A C -p tcp -j DROP\nCOMMIT\n";
        assert_eq!(
            rules_in_chain_order(input),
            "*nat\n:B - [0:0]\n:A - [0:0]\n:C - [0:0]\n\
             -A A -j RETURN\n-A B -m comment --comment one -j C\n-A B -j A\n\
             -A C -j RETURN\n-A C -p tcp -j DROP\nCOMMIT\n"
        );
    }

    #[test]
    fn other_lines_bound_the_regrouping() {
        // A deletion between appends must stay between them: the order decides what it deletes.
        let input = "*nat\n-A B -j RETURN\n-A A -j RETURN\n-D A -j RETURN\n-A A -j DROP\n-A 0 -j RETURN\nCOMMIT\n\
                     *filter\n-A Z -j DROP\n-A Y -j DROP\nCOMMIT\n";
        assert_eq!(
            rules_in_chain_order(input),
            "*nat\n-A A -j RETURN\n-A B -j RETURN\n-D A -j RETURN\n-A 0 -j RETURN\n-A A -j DROP\nCOMMIT\n\
             *filter\n-A Y -j DROP\n-A Z -j DROP\nCOMMIT\n"
        );
    }

    #[test]
    fn keeps_every_byte() {
        let input = "*nat\n-A B x\n-A C y\n-A A z"; // no final newline
        let out = rules_in_chain_order(input);
        assert_eq!(out, "*nat\n-A B x\n-A C y\n-A A z");
        assert_eq!(out.len(), input.len());
        let (mut a, mut b): (Vec<&str>, Vec<&str>) = (input.split('\n').collect(), out.split('\n').collect());
        a.sort();
        b.sort();
        assert_eq!(a, b);
    }
}
