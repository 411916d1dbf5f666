//! Output for people (aligned tables, progress lines) and for scripts (`--json`).
//!
//! Strings from the daemon can carry names made inside a VE (file names, console output):
//! everything printed for people goes through [`escape`] (or [`escape_log`]), so a newline
//! cannot forge a table row and an escape sequence cannot drive the terminal. JSON output
//! stays exact.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::io::{IsTerminal, Write};

/// Characters that must not reach a terminal as they are: C0 controls, DEL, C1 controls
/// (U+0080..U+009F; some terminals act on them), and the line separators and bidi
/// overrides that make text display other than it reads.
fn is_unsafe(c: char) -> bool {
    c.is_control() || matches!(c, '\u{2028}' | '\u{2029}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

fn push_escaped(out: &mut String, c: char) {
    match c {
        '\n' => out.push_str("\\n"),
        '\r' => out.push_str("\\r"),
        '\t' => out.push_str("\\t"),
        c if (c as u32) < 0x80 => {
            let _ = write!(out, "\\x{:02x}", c as u32);
        }
        c => {
            let _ = write!(out, "\\u{{{:x}}}", c as u32);
        }
    }
}

/// One line of text safe for a terminal: control characters as `\n`, `\x1b`, `\u{9b}`;
/// a backslash doubled, so every escape reads one way. Ordinary text is kept as it is.
pub fn escape(s: &str) -> Cow<'_, str> {
    if !s.chars().any(|c| is_unsafe(c) || c == '\\') {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if c == '\\' {
            out.push_str("\\\\");
        } else if is_unsafe(c) {
            push_escaped(&mut out, c);
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// Console output safe for a terminal: lines and tabs kept (and `\r` right before `\n`,
/// as a terminal writes line ends), every other control character escaped like
/// [`escape`], bytes that are not UTF-8 as `\xff`. Backslashes are kept (logs are read,
/// not parsed).
pub fn escape_log(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len());
    for chunk in data.utf8_chunks() {
        let text = chunk.valid();
        let mut it = text.chars().peekable();
        while let Some(c) = it.next() {
            match c {
                '\n' | '\t' => out.push(c),
                '\r' if it.peek() == Some(&'\n') => out.push(c),
                c if is_unsafe(c) => push_escaped(&mut out, c),
                c => out.push(c),
            }
        }
        for b in chunk.invalid() {
            let _ = write!(out, "\\x{b:02x}");
        }
    }
    out
}

/// Print rows as an aligned table with a header. Cells are escaped: one row is one line.
pub fn table(header: &[&str], rows: &[Vec<String>]) {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|r| r.iter().map(|c| escape(c).into_owned()).collect())
        .collect();
    let mut w: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let s: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{:<width$}", c, width = w[i]))
            .collect();
        println!("{}", s.join("  ").trim_end());
    };
    line(header.to_vec());
    for r in &rows {
        line(r.iter().map(|s| s.as_str()).collect());
    }
}

pub fn json<T: serde::Serialize>(v: &T) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

/// Progress on stderr: one updating line on a terminal, plain lines otherwise.
pub struct Progress {
    tty: bool,
    last_len: usize,
}

impl Progress {
    pub fn new() -> Self {
        Progress {
            tty: std::io::stderr().is_terminal(),
            last_len: 0,
        }
    }

    pub fn update(&mut self, message: &str, done: u64, total: u64) {
        let msg: String = message.chars().take(100).collect();
        let msg = escape(&msg);
        let text = if total > 0 {
            format!("[{done}/{total}] {msg}")
        } else {
            format!("[{done}] {msg}")
        };
        let mut e = std::io::stderr();
        if self.tty {
            let _ = write!(e, "\r\x1b[K{text}");
            self.last_len = text.len();
        } else {
            let _ = writeln!(e, "{text}");
        }
        let _ = e.flush();
    }

    pub fn finish(&mut self) {
        if self.tty && self.last_len > 0 {
            eprintln!();
            self.last_len = 0;
        }
    }
}

pub fn ago(unix: u64) -> String {
    let now = vessel_ve::now_unix();
    let d = now.saturating_sub(unix);
    match d {
        0..=59 => format!("{d}s ago"),
        60..=3599 => format!("{}m ago", d / 60),
        3600..=86399 => format!("{}h ago", d / 3600),
        _ => format!("{}d ago", d / 86400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_cells_cannot_forge_lines_or_drive_the_terminal() {
        assert_eq!(escape("plain/path.txt"), "plain/path.txt");
        assert!(matches!(escape("ünïcode 文字"), Cow::Borrowed(_)));
        assert_eq!(escape("a\nb"), "a\\nb");
        assert_eq!(escape("a\rb\tc"), "a\\rb\\tc");
        assert_eq!(escape("\x1b[2Jx"), "\\x1b[2Jx");
        assert_eq!(escape("del\x7f"), "del\\x7f");
        assert_eq!(escape("csi\u{9b}31m"), "csi\\u{9b}31m");
        assert_eq!(escape("bidi\u{202e}txt"), "bidi\\u{202e}txt");
        assert_eq!(escape("back\\slash"), "back\\\\slash", "unambiguous");
        for c in (0u32..0x20).chain(0x7f..0xa0) {
            let s = char::from_u32(c).unwrap().to_string();
            let e = escape(&s);
            assert!(e.chars().all(|c| !c.is_control()), "{c:#x} -> {e:?}");
        }
    }

    #[test]
    fn logs_keep_lines_and_tabs_and_escape_the_rest() {
        assert_eq!(escape_log(b"one\r\ntwo\tx\n"), "one\r\ntwo\tx\n");
        assert_eq!(escape_log(b"\x1b[2J\x1b]0;title\x07"), "\\x1b[2J\\x1b]0;title\\x07");
        assert_eq!(escape_log(b"over\rwrite"), "over\\rwrite");
        assert_eq!(escape_log(b"bad \xff\xfe utf8"), "bad \\xff\\xfe utf8");
        assert_eq!(escape_log("c1 \u{9b}".as_bytes()), "c1 \\u{9b}");
        assert_eq!(escape_log(b"C:\\dir"), "C:\\dir", "backslashes kept");
        assert!(!escape_log(b"\x1b\x1b\r\x00").bytes().any(|b| b < 0x20 && b != b'\n'));
    }
}
