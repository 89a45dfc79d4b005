//! kubectl-like tables: a header row and left-aligned columns separated by three spaces (the
//! padding of kubectl's tabwriter), no trailing whitespace.

const GAP: usize = 3;

#[derive(Debug, Clone, Default)]
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&str]) -> Self {
        Table { header: header.iter().map(|h| h.to_string()).collect(), rows: Vec::new() }
    }

    /// Adds a row; missing cells are empty, extra cells are kept (they widen the table).
    pub fn push(&mut self, row: Vec<String>) {
        self.rows.push(row);
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Renders the table, each line prefixed by `indent`.
    pub fn render_indented(&self, indent: &str) -> String {
        let ncols = self.rows.iter().map(Vec::len).chain([self.header.len()]).max().unwrap_or(0);
        let mut widths = vec![0; ncols];
        for row in std::iter::once(&self.header).chain(&self.rows) {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let mut out = String::new();
        for row in std::iter::once(&self.header).chain(&self.rows) {
            let mut line = String::from(indent);
            for (i, width) in widths.iter().enumerate() {
                let cell = row.get(i).map_or("", String::as_str);
                line.push_str(cell);
                if i + 1 < ncols {
                    let pad = width - cell.chars().count() + GAP;
                    line.extend(std::iter::repeat_n(' ', pad));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }

    pub fn render(&self) -> String {
        self.render_indented("")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|c| c.to_string()).collect()
    }

    #[test]
    fn columns_align_under_the_header() {
        let mut t = Table::new(&["NAME", "ZONE", "ERROR"]);
        t.push(s(&["node-a", "zone-a", "-"]));
        t.push(s(&["a-much-longer-node", "z", "iptables-restore: line 3 failed"]));
        let out = t.render();
        assert_eq!(
            out,
            "NAME                 ZONE     ERROR\n\
             node-a               zone-a   -\n\
             a-much-longer-node   z        iptables-restore: line 3 failed\n"
        );
    }

    #[test]
    fn no_trailing_whitespace_and_short_rows() {
        let mut t = Table::new(&["A", "B"]);
        t.push(s(&["x"]));
        t.push(s(&["", ""]));
        let out = t.render_indented("  ");
        assert_eq!(out, "  A   B\n  x\n\n");
        assert!(out.lines().all(|l| l == l.trim_end()));
    }

    #[test]
    fn widths_count_characters_not_bytes() {
        let mut t = Table::new(&["X", "Y"]);
        t.push(s(&["µµ", "1"]));
        assert_eq!(t.render(), "X    Y\nµµ   1\n");
    }

    #[test]
    fn header_only() {
        let t = Table::new(&["NAME", "AGE"]);
        assert!(t.is_empty());
        assert_eq!(t.render(), "NAME   AGE\n");
    }
}
