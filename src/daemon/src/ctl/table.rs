//! Plain-text tables: a header row, columns padded to their widest cell,
//! numbers right-aligned. Widths are terminal columns (`unicode-width`),
//! not chars: a client's name may be CJK, two columns a character, or hold
//! a zero-width space, and counted in chars either shifted the cells after
//! it out of line.

use unicode_width::UnicodeWidthStr;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Align {
    Left,
    Right,
}

#[derive(Debug)]
pub struct Table {
    headers: Vec<&'static str>,
    align: Vec<Align>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// Columns whose header is given with a leading `>` are right-aligned
    /// (`">BYTES"`); the `>` is not shown.
    pub fn new(columns: &[&'static str]) -> Table {
        Table {
            headers: columns
                .iter()
                .map(|c| c.strip_prefix('>').unwrap_or(c))
                .collect(),
            align: columns
                .iter()
                .map(|c| {
                    if c.starts_with('>') {
                        Align::Right
                    } else {
                        Align::Left
                    }
                })
                .collect(),
            rows: Vec::new(),
        }
    }

    /// Missing cells are left empty; extra ones are dropped.
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    pub fn render(&self) -> String {
        let width = |i: usize| {
            self.rows
                .iter()
                .filter_map(|r| r.get(i))
                .map(|c| c.width())
                .chain(std::iter::once(self.headers[i].width()))
                .max()
                .unwrap_or(0)
        };
        let widths: Vec<usize> = (0..self.headers.len()).map(width).collect();
        let mut out = String::new();
        let headers: Vec<String> = self.headers.iter().map(|h| (*h).to_owned()).collect();
        for row in std::iter::once(&headers).chain(self.rows.iter()) {
            let mut line = String::new();
            for (i, w) in widths.iter().enumerate() {
                let cell = row.get(i).map(String::as_str).unwrap_or("");
                if i > 0 {
                    line.push_str("  ");
                }
                // By hand: `format!`'s width counts chars.
                let pad = " ".repeat(w.saturating_sub(cell.width()));
                match self.align[i] {
                    Align::Left => {
                        line.push_str(cell);
                        line.push_str(&pad);
                    }
                    Align::Right => {
                        line.push_str(&pad);
                        line.push_str(cell);
                    }
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pads_and_aligns() {
        let mut t = Table::new(&["NAME", ">BYTES"]);
        t.row(vec!["memfd".into(), "4 KiB".into()]);
        t.row(vec!["system".into(), "12 MiB".into()]);
        assert_eq!(
            t.render(),
            "NAME     BYTES\nmemfd    4 KiB\nsystem  12 MiB\n"
        );
    }

    /// Cells are padded to terminal columns: a CJK character takes two,
    /// a zero-width space none.
    #[test]
    fn pads_wide_and_zero_width_characters_to_columns() {
        let mut t = Table::new(&["NAME", ">BYTES"]);
        t.row(vec!["相机-前".into(), "4 KiB".into()]);
        t.row(vec!["cam\u{200b}era".into(), "12 MiB".into()]);
        t.row(vec!["memfd".into(), "0 B".into()]);
        let text = t.render();
        let widths: Vec<usize> = text.lines().map(UnicodeWidthStr::width).collect();
        assert!(widths.iter().all(|w| *w == widths[0]), "{widths:?}\n{text}");
        assert_eq!(text.lines().next(), Some("NAME      BYTES"));
    }
}
