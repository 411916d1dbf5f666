//! Output for people (aligned tables, progress lines) and for scripts (`--json`).

use std::io::{IsTerminal, Write};

/// Print rows as an aligned table with a header.
pub fn table(header: &[&str], rows: &[Vec<String>]) {
    let mut w: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
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
    for r in rows {
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
