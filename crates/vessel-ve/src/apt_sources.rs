//! Find the Debian mirror the host already uses, from its apt sources (deb822 `.sources`
//! files and one-line `sources.list`), so `template build debian` never hard-codes a host.

use std::path::Path;

/// The first `deb` mirror URI serving `suite` (e.g. `bookworm`) with component `main`.
/// Security and update suites are skipped because debootstrap needs the base suite.
pub fn mirror_from_sources(files: &[(String, String)], suite: &str) -> Option<String> {
    for (name, text) in files {
        let found = if name.ends_with(".sources") {
            from_deb822(text, suite)
        } else {
            from_one_line(text, suite)
        };
        if found.is_some() {
            return found;
        }
    }
    None
}

fn from_deb822(text: &str, suite: &str) -> Option<String> {
    for para in text.split("\n\n") {
        let mut types = "";
        let mut uris = "";
        let mut suites = "";
        let mut comps = "";
        let mut enabled = true;
        for line in para.lines() {
            if line.starts_with('#') {
                continue;
            }
            if let Some((k, v)) = line.split_once(':') {
                match k.trim().to_ascii_lowercase().as_str() {
                    "types" => types = v.trim(),
                    "uris" => uris = v.trim(),
                    "suites" => suites = v.trim(),
                    "components" => comps = v.trim(),
                    "enabled" => enabled = v.trim() != "no",
                    _ => {}
                }
            }
        }
        if enabled
            && types.split_whitespace().any(|t| t == "deb")
            && suites.split_whitespace().any(|s| s == suite)
            && comps.split_whitespace().any(|c| c == "main")
        {
            if let Some(u) = uris.split_whitespace().next() {
                return Some(u.to_string());
            }
        }
    }
    None
}

fn from_one_line(text: &str, suite: &str) -> Option<String> {
    for line in text.lines() {
        let line = line.trim();
        let mut parts = line.split_whitespace();
        if parts.next() != Some("deb") {
            continue;
        }
        let mut rest: Vec<&str> = parts.collect();
        if rest.first().is_some_and(|p| p.starts_with('[')) {
            let end = rest.iter().position(|p| p.ends_with(']')).unwrap_or(0);
            rest.drain(..=end);
        }
        if rest.len() >= 3 && rest[1] == suite && rest[2..].contains(&"main") {
            return Some(rest[0].to_string());
        }
    }
    None
}

/// Read the host's apt sources: `/etc/apt/sources.list` and `/etc/apt/sources.list.d/*`.
pub fn host_mirror(etc_apt: &Path, suite: &str) -> Option<String> {
    let mut files = Vec::new();
    if let Ok(t) = std::fs::read_to_string(etc_apt.join("sources.list")) {
        files.push(("sources.list".to_string(), t));
    }
    if let Ok(rd) = std::fs::read_dir(etc_apt.join("sources.list.d")) {
        let mut names: Vec<_> = rd.flatten().map(|e| e.path()).collect();
        names.sort();
        for p in names {
            let n = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            if n.ends_with(".sources") || n.ends_with(".list") {
                if let Ok(t) = std::fs::read_to_string(&p) {
                    files.push((n, t));
                }
            }
        }
    }
    mirror_from_sources(&files, suite)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deb822_picks_base_suite() {
        let t = "Types: deb\n# comment\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\nComponents: main\n\nTypes: deb\nURIs: http://sec.example/debian-security\nSuites: bookworm-security\nComponents: main\n";
        let files = vec![("debian.sources".to_string(), t.to_string())];
        assert_eq!(
            mirror_from_sources(&files, "bookworm").as_deref(),
            Some("http://mirror.example/debian")
        );
        assert_eq!(mirror_from_sources(&files, "trixie"), None);
    }

    #[test]
    fn one_line_with_options() {
        let t = "# x\ndeb-src http://a/debian bookworm main\ndeb [arch=amd64 signed-by=/k] http://b/debian bookworm main contrib\n";
        let files = vec![("sources.list".to_string(), t.to_string())];
        assert_eq!(
            mirror_from_sources(&files, "bookworm").as_deref(),
            Some("http://b/debian")
        );
    }

    #[test]
    fn disabled_paragraph_skipped() {
        let t = "Types: deb\nURIs: http://off/debian\nSuites: bookworm\nComponents: main\nEnabled: no\n";
        let files = vec![("x.sources".to_string(), t.to_string())];
        assert_eq!(mirror_from_sources(&files, "bookworm"), None);
    }
}
