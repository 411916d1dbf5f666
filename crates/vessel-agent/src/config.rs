//! Reading the node config (`node.toml`, see `vessel_types::config` for its contents) at
//! daemon start. The default file is `ROOT/node.toml` and may be absent (built-in
//! defaults); a file named with `--config` / `VESSEL_CONFIG` must exist.

use std::path::{Path, PathBuf};
use vessel_types::config::{parse, ConfigError, NodeSettings, CONFIG_FILE};

/// Where the daemon's config comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigFile {
    pub path: PathBuf,
    /// Named by the operator: a missing file is an error, not the built-in defaults.
    pub required: bool,
}

impl ConfigFile {
    /// `explicit` (from `--config`) or else `ROOT/node.toml`.
    pub fn resolve(root: &Path, explicit: Option<&Path>) -> ConfigFile {
        match explicit {
            Some(p) => ConfigFile {
                path: p.to_path_buf(),
                required: true,
            },
            None => ConfigFile {
                path: root.join(CONFIG_FILE),
                required: false,
            },
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    // (Fields not named `source`: the message includes them, a chain must not repeat them.)
    #[error("node config {path}: {error}")]
    Read { path: PathBuf, error: std::io::Error },
    #[error("node config {path}: {error}")]
    Invalid { path: PathBuf, error: ConfigError },
}

/// The settings in `file`, or the built-in defaults if it is absent and not required.
pub fn load(file: &ConfigFile) -> Result<NodeSettings, LoadError> {
    let text = match std::fs::read(&file.path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !file.required => {
            return Ok(NodeSettings::default());
        }
        Err(error) => {
            return Err(LoadError::Read {
                path: file.path.clone(),
                error,
            })
        }
    };
    let invalid = |error| LoadError::Invalid {
        path: file.path.clone(),
        error,
    };
    let text = String::from_utf8(text).map_err(|e| {
        let at = e.utf8_error().valid_up_to();
        let line = e.as_bytes()[..at].iter().filter(|&&b| b == b'\n').count() + 1;
        invalid(ConfigError {
            line,
            key: None,
            message: "not UTF-8 text".into(),
        })
    })?;
    parse(&text).map_err(invalid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_default_file_means_builtins_missing_named_file_is_an_error() {
        let d = tempfile::tempdir().unwrap();
        let f = ConfigFile::resolve(d.path(), None);
        assert_eq!(f.path, d.path().join("node.toml"));
        assert_eq!(load(&f).unwrap(), NodeSettings::default());
        let named = d.path().join("elsewhere.toml");
        let e = load(&ConfigFile::resolve(d.path(), Some(&named))).unwrap_err();
        assert!(e.to_string().contains("elsewhere.toml"), "{e}");
    }

    #[test]
    fn bad_file_names_file_line_and_key() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("node.toml");
        std::fs::write(&p, "version = 1\n[defaults]\npids = \"many\"\n").unwrap();
        let e = load(&ConfigFile::resolve(d.path(), None)).unwrap_err().to_string();
        assert!(
            e.starts_with(&format!("node config {}: line 3, key defaults.pids: ", p.display())),
            "{e}"
        );
        std::fs::write(&p, b"version = 1\n\xff\n").unwrap();
        let e = load(&ConfigFile::resolve(d.path(), None)).unwrap_err().to_string();
        assert!(e.contains("line 2") && e.contains("UTF-8"), "{e}");
        std::fs::write(&p, "version = 1\n[defaults]\nmemory = \"1G\"\n").unwrap();
        let s = load(&ConfigFile::resolve(d.path(), None)).unwrap();
        assert_eq!(s.limits.defaults.memory_max, Some(1 << 30));
    }
}
