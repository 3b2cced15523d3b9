//! Plain aligned tables: a header, a dashed rule under each header, columns
//! separated by two spaces, as the reference's `status` output shows.

use anstyle::Style;
use unicode_width::UnicodeWidthStr;

/// A cell's text plus an optional style applied after padding, so colour codes
/// never disturb alignment.
pub struct Cell {
    pub text: String,
    pub style: Option<Style>,
}

impl From<String> for Cell {
    fn from(text: String) -> Self {
        Cell { text, style: None }
    }
}

impl From<&str> for Cell {
    fn from(text: &str) -> Self {
        Cell {
            text: text.to_string(),
            style: None,
        }
    }
}

/// Renders rows under `headers`; the last column is not padded.
pub fn render(headers: &[&str], rows: &[Vec<Cell>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.width()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.text.width());
        }
    }
    let mut out = String::new();
    let header_cells: Vec<Cell> = headers.iter().map(|h| Cell::from(*h)).collect();
    let rule_cells: Vec<Cell> = headers
        .iter()
        .map(|h| Cell::from("-".repeat(h.width())))
        .collect();
    for row in [&header_cells, &rule_cells].into_iter().chain(rows) {
        let last = row.len().saturating_sub(1);
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            let padding = if i == last {
                0
            } else {
                widths[i] + 2 - cell.text.width()
            };
            match cell.style {
                Some(style) => line.push_str(&super::paint(style, &cell.text)),
                None => line.push_str(&cell.text),
            }
            line.extend(std::iter::repeat_n(' ', padding));
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out.pop();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligns_wide_characters_by_display_width() {
        let rows = vec![
            vec![Cell::from("名前"), Cell::from("x")],
            vec![Cell::from("bob"), Cell::from("y")],
        ];
        let text = render(&["USER", "NOTE"], &rows);
        assert_eq!(text, "USER  NOTE\n----  ----\n名前  x\nbob   y");
    }

    #[test]
    fn aligns_columns_and_underlines_headers() {
        let rows = vec![
            vec![
                Cell::from("0"),
                Cell::from("AVAILABLE"),
                Cell::from("45MB used"),
            ],
            vec![Cell::from("10"), Cell::from("IN_USE"), Cell::from("-")],
        ];
        let text = render(&["GPU", "STATUS", "VALIDATION"], &rows);
        assert_eq!(
            text,
            "GPU  STATUS     VALIDATION\n---  ------     ----------\n0    AVAILABLE  45MB used\n10   IN_USE     -"
        );
    }
}
