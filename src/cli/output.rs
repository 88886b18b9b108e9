//! What the commands print: for people by default (a list as a table with
//! a header row, one object as `key: value` lines), and with `--json` the
//! server's answer as it came, for scripts.
//!
//! The tables are comfy-table's. It measures cells in display columns (an
//! intent or a comment may hold any Unicode), and, given a width, wraps
//! cells so that a table fits a narrow terminal instead of running off its
//! edge; padding with `{:<w$}` does neither. tabled does the same, but is
//! built around deriving rows from typed structs, and what we print are the
//! server's JSON answers. On a terminal a table is wrapped to its width;
//! piped, every row stays on one line for grep and awk. Neither way has
//! colours or box-drawing lines.

use std::io::IsTerminal;

use clap::Args;
use comfy_table::{presets, CellAlignment, ContentArrangement, Table};
use serde_json::Value;

/// `--json`, on every command that prints an answer from the server.
#[derive(Args, Clone, Copy)]
pub(crate) struct Format {
    /// Print the answer as JSON, every field as the API sends it, instead
    /// of a table or `key: value` lines: for scripts.
    #[arg(long)]
    json: bool,
}

impl Format {
    /// `answer[items]`, a list, as a table of `columns` with one row per item.
    pub(crate) fn list(
        self,
        answer: &Value,
        items: &str,
        columns: &[Column],
    ) -> anyhow::Result<()> {
        self.print(answer, || {
            let rows = answer[items].as_array().map_or(&[][..], Vec::as_slice);
            table(columns, rows)
        })
    }

    /// One object as `key: value` lines, the fields in `first` first.
    pub(crate) fn object(self, answer: &Value, first: &[&str]) -> anyhow::Result<()> {
        self.print(answer, || fields(answer, first))
    }

    /// `answer` as JSON, or what `human` makes of it.
    pub(crate) fn print(
        self,
        answer: &Value,
        human: impl FnOnce() -> String,
    ) -> anyhow::Result<()> {
        if self.json {
            emit(&(serde_json::to_string_pretty(answer)? + "\n"))
        } else {
            emit(&human())
        }
    }
}

/// Writes `text` to standard output. A reader that has closed the pipe
/// (`| head`, `| grep -m1`) has all it wanted: that ends the command
/// quietly instead of in `print!`'s panic.
pub(crate) fn emit(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        written => Ok(written?),
    }
}

/// A column of a table: which field of each item it shows, and how.
pub(crate) struct Column {
    header: &'static str,
    field: &'static str,
    /// Shown up to this many characters: a digest's first characters tell
    /// versions apart, and the whole of it would crowd out the rest.
    chars: Option<usize>,
    right: bool,
}

impl Column {
    pub(crate) const fn new(header: &'static str, field: &'static str) -> Self {
        Column {
            header,
            field,
            chars: None,
            right: false,
        }
    }

    /// A count or a version number, aligned right.
    pub(crate) const fn number(header: &'static str, field: &'static str) -> Self {
        Column {
            right: true,
            ..Column::new(header, field)
        }
    }

    pub(crate) const fn abbreviated(
        header: &'static str,
        field: &'static str,
        chars: usize,
    ) -> Self {
        Column {
            chars: Some(chars),
            ..Column::new(header, field)
        }
    }
}

/// A table of `columns` with one row for each of `items`.
pub(crate) fn table(columns: &[Column], items: &[Value]) -> String {
    let rows = items
        .iter()
        .map(|item| {
            columns
                .iter()
                .map(|c| {
                    let text = shown(c.field, &item[c.field]);
                    match c.chars {
                        Some(n) => text.chars().take(n).collect(),
                        None => text,
                    }
                })
                .collect()
        })
        .collect();
    let right: Vec<usize> = (0..columns.len()).filter(|&i| columns[i].right).collect();
    grid(
        Some(columns.iter().map(|c| c.header).collect()),
        rows,
        &right,
    )
}

/// `object`'s fields as `key: value` lines: the fields named in `first`
/// in that order, then the rest in the answer's order. A nested object's
/// fields are named with dots (`request.intent`).
pub(crate) fn fields(object: &Value, first: &[&str]) -> String {
    let mut pairs = Vec::new();
    flatten("", object, &mut pairs);
    let top = |key: &str| key.split('.').next().unwrap_or(key).to_owned();
    // Stable: within one rank the answer's order stays.
    pairs.sort_by_key(|(key, _)| {
        first
            .iter()
            .position(|f| *f == top(key))
            .unwrap_or(first.len())
    });
    grid(
        None,
        pairs
            .into_iter()
            .map(|(key, value)| vec![format!("{key}:"), value])
            .collect(),
        &[],
    )
}

fn flatten(key: &str, value: &Value, out: &mut Vec<(String, String)>) {
    match value {
        Value::Object(map) if !map.is_empty() => {
            for (name, inner) in map {
                let key = if key.is_empty() {
                    name.clone()
                } else {
                    format!("{key}.{name}")
                };
                flatten(&key, inner, out);
            }
        }
        _ => {
            let field = key.rsplit('.').next().unwrap_or(key);
            out.push((key.to_owned(), shown(field, value)));
        }
    }
}

/// One value of the field `field`, as a person reads it.
fn shown(field: &str, value: &Value) -> String {
    match value {
        Value::Null => "-".into(),
        Value::String(text) if text.contains('\n') => {
            format!("({} lines: --json prints them)", text.lines().count())
        }
        Value::String(text) => printable(text),
        Value::Number(n) if is_time(field) => n
            .as_i64()
            .and_then(rfc3339)
            .unwrap_or_else(|| n.to_string()),
        Value::Array(items) if items.is_empty() => "-".into(),
        Value::Array(items) => items
            .iter()
            .map(|item| shown(field, item))
            .collect::<Vec<_>>()
            .join(", "),
        Value::Object(_) => printable(&value.to_string()),
        Value::Bool(_) | Value::Number(_) => value.to_string(),
    }
}

/// An agent's text (an intent, a held request) is shown to admins: a
/// control character in it must not reach their terminal as one.
fn printable(text: &str) -> String {
    text.chars()
        .flat_map(|c| {
            let escaped: Vec<char> = if c.is_control() {
                c.escape_default().collect()
            } else {
                vec![c]
            };
            escaped
        })
        .collect()
}

/// Fields that hold Unix times: the API's `*_at` and the envelope's JWT
/// claims (`iat`, `exp`).
fn is_time(field: &str) -> bool {
    field.ends_with("_at") || matches!(field, "iat" | "exp")
}

fn rfc3339(unix: i64) -> Option<String> {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()?
        .format(&time::format_description::well_known::Rfc3339)
        .ok()
}

/// Rows in columns two spaces apart, under `header` if there is one, the
/// columns numbered in `right` aligned right. On a terminal the cells
/// wrap to fit its width; otherwise each row is one line.
pub(crate) fn grid(header: Option<Vec<&str>>, rows: Vec<Vec<String>>, right: &[usize]) -> String {
    layout(header, rows, right, terminal_width())
}

/// Below this many characters a column is mostly wrapping: a terminal
/// too narrow to give each column this much gets one line per row (which
/// it wraps as it does any long line).
const NARROWEST_COLUMN: usize = 8;

fn layout(
    header: Option<Vec<&str>>,
    rows: Vec<Vec<String>>,
    right: &[usize],
    width: Option<u16>,
) -> String {
    let columns = header
        .as_ref()
        .map(Vec::len)
        .or_else(|| rows.first().map(Vec::len))
        .unwrap_or(0);
    let width = width.filter(|&w| usize::from(w) >= columns * NARROWEST_COLUMN);
    let mut table = Table::new();
    table.load_preset(presets::NOTHING);
    if let Some(width) = width {
        table
            .set_content_arrangement(ContentArrangement::Dynamic)
            .set_width(width);
    }
    if let Some(header) = header {
        table.set_header(header);
    }
    table.add_rows(rows);
    for (i, column) in table.column_iter_mut().enumerate() {
        column.set_padding((0, 2));
        if right.contains(&i) {
            column.set_cell_alignment(CellAlignment::Right);
        }
    }
    let text = table.trim_fmt();
    if text.is_empty() {
        text
    } else {
        text + "\n"
    }
}

/// The width of the terminal standard output is, if it is one.
fn terminal_width() -> Option<u16> {
    let stdout = std::io::stdout();
    if !stdout.is_terminal() {
        return None;
    }
    rustix::termios::tcgetwinsize(&stdout)
        .ok()
        .map(|size| size.ws_col)
        .filter(|&columns| columns > 0)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_list_is_a_header_and_one_aligned_row_per_item() {
        let columns = [Column::new("NAME", "name"), Column::number("N", "n")];
        let text = table(
            &columns,
            &[
                json!({"name": "alpha", "n": 7}),
                json!({"name": "b", "n": 12}),
            ],
        );
        assert_eq!(text, "NAME    N\nalpha   7\nb      12\n");
    }

    #[test]
    fn an_empty_list_is_its_header() {
        assert_eq!(table(&[Column::new("NAME", "name")], &[]), "NAME\n");
    }

    #[test]
    fn an_object_is_key_value_lines_nested_fields_dotted_times_readable() {
        let text = fields(
            &json!({
                "status": "pending",
                "id": "a1",
                "created_at": 0,
                "request": {"intent": "pay\u{1b}[2J"},
                "scopes": [],
                "pem": "-----BEGIN X-----\nAA\n-----END X-----\n",
                "reason": null,
            }),
            &["id", "status"],
        );
        assert_eq!(
            text,
            "id:              a1\n\
             status:          pending\n\
             created_at:      1970-01-01T00:00:00Z\n\
             pem:             (3 lines: --json prints them)\n\
             reason:          -\n\
             request.intent:  pay\\u{1b}[2J\n\
             scopes:          -\n"
        );
    }

    fn wide_rows() -> Vec<Vec<String>> {
        (0..3)
            .map(|i| {
                vec![
                    format!("agent-{i}"),
                    "orders:read, payments:refund, reports:weekly-summary".into(),
                    "2026-12-06T17:27:29Z".into(),
                ]
            })
            .collect()
    }

    #[test]
    fn on_a_narrow_terminal_cells_wrap_to_its_width() {
        let text = layout(
            Some(vec!["NAME", "SCOPES", "CREATED"]),
            wide_rows(),
            &[],
            Some(50),
        );
        assert!(text.lines().all(|l| l.chars().count() <= 50), "{text}");
        assert!(text.lines().count() > 4, "{text}");
        assert!(text.starts_with("NAME "), "{text}");
    }

    #[test]
    fn too_narrow_a_terminal_or_a_pipe_gets_one_line_a_row() {
        for width in [Some(20), None] {
            let text = layout(
                Some(vec!["NAME", "SCOPES", "CREATED"]),
                wide_rows(),
                &[],
                width,
            );
            assert_eq!(text.lines().count(), 4, "{text}");
            assert!(text.lines().all(|l| !l.ends_with(' ')), "{text}");
        }
    }

    #[test]
    fn a_digest_column_shows_its_first_characters() {
        let columns = [Column::abbreviated("SHA256", "d", 4)];
        assert_eq!(table(&columns, &[json!({"d": "abcdef"})]), "SHA256\nabcd\n");
    }
}
