//! Tables for people, JSON for scripts.

use std::fmt::Write as _;
use std::io::Write as _;

use crate::connect::CliError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Json,
}

/// A table: a header and rows of cells, rendered with aligned columns.
#[derive(Debug)]
pub struct Table {
    header: Vec<&'static str>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: Vec<&'static str>) -> Self {
        Self {
            header,
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn render(&self) -> String {
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (i, cell) in row.iter().enumerate() {
                if let Some(w) = widths.get_mut(i) {
                    *w = (*w).max(cell.chars().count());
                }
            }
        }
        let mut out = String::new();
        let line = |out: &mut String, cells: &mut dyn Iterator<Item = &str>| {
            let mut s = String::new();
            for (i, cell) in cells.enumerate() {
                let w = widths.get(i).copied().unwrap_or(0);
                let _ = write!(s, "{cell:<w$}   ");
            }
            out.push_str(s.trim_end());
            out.push('\n');
        };
        line(&mut out, &mut self.header.iter().copied());
        for row in &self.rows {
            line(&mut out, &mut row.iter().map(String::as_str));
        }
        out
    }
}

/// Writes a command's output to stdout. A reader that went away (`ferryctl
/// … | head`) is [`CliError::OutputClosed`], which ends the command quietly.
pub fn emit(text: &str) -> Result<(), CliError> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Err(CliError::OutputClosed),
        Err(e) => Err(CliError::Failed {
            message: format!("cannot write the output: {e}"),
        }),
    }
}

/// `2026-11-25 09:10:00Z (3m ago)` from unix milliseconds; `-` for 0.
pub fn when(unix_ms: i64, now_ms: i64) -> String {
    if unix_ms <= 0 {
        return "-".into();
    }
    let Ok(t) = time::OffsetDateTime::from_unix_timestamp(unix_ms / 1000) else {
        return "-".into();
    };
    let fmt = time::macros::format_description!("[year]-[month]-[day] [hour]:[minute]:[second]Z");
    let stamp = t.format(&fmt).unwrap_or_else(|_| "-".into());
    format!("{stamp} ({})", ago(now_ms - unix_ms))
}

fn ago(ms: i64) -> String {
    let s = (ms / 1000).unsigned_abs();
    let span = match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m", s / 60),
        3600..=86_399 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    };
    if ms < 0 {
        format!("in {span}")
    } else {
        format!("{span} ago")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_align_to_the_widest_cell() {
        let mut t = Table::new(vec!["NAME", "AGENTS"]);
        t.row(vec!["a-long-cluster".into(), "3".into()]);
        t.row(vec!["b".into(), "12".into()]);
        let out = t.render();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], "NAME             AGENTS");
        assert_eq!(lines[1], "a-long-cluster   3");
        assert_eq!(lines[2], "b                12");
    }

    #[test]
    fn times_read_as_age() {
        assert_eq!(when(0, 5), "-");
        let t = 1_764_061_800_000; // 2025-11-25 09:10:00Z
        assert_eq!(when(t, t + 125_000), "2025-11-25 09:10:00Z (2m ago)");
        assert_eq!(when(t, t - 3_600_000), "2025-11-25 09:10:00Z (in 1h)");
    }
}
