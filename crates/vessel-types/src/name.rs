//! Names of VEs and templates: what a user types, what becomes a hostname, a cgroup and a
//! directory name. Validated once here so no layer below has to guess.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Longest accepted name. Short enough that derived interface names (`vh` + index) and
/// paths stay well inside kernel limits.
pub const MAX_NAME_LEN: usize = 48;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("name is empty: give a name such as 'web1'")]
    Empty,
    #[error("name '{0}' is longer than {MAX_NAME_LEN} characters")]
    TooLong(String),
    #[error("name '{0}' must start with a lowercase letter")]
    BadStart(String),
    #[error("name '{0}' may hold only lowercase letters, digits and '-' (not '{1}')")]
    BadChar(String, char),
    #[error("name '{0}' must not end with '-'")]
    BadEnd(String),
}

/// A validated VE or template name: `[a-z][a-z0-9-]*`, at most [`MAX_NAME_LEN`] bytes,
/// not ending in `-`. Valid as a hostname label, a path component and a cgroup name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Name(String);

impl Name {
    pub fn parse(s: &str) -> Result<Self, NameError> {
        let first = s.chars().next().ok_or(NameError::Empty)?;
        if s.len() > MAX_NAME_LEN {
            return Err(NameError::TooLong(s.to_string()));
        }
        if !first.is_ascii_lowercase() {
            return Err(NameError::BadStart(s.to_string()));
        }
        if let Some(c) = s
            .chars()
            .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
        {
            return Err(NameError::BadChar(s.to_string(), c));
        }
        if s.ends_with('-') {
            return Err(NameError::BadEnd(s.to_string()));
        }
        Ok(Name(s.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Name {
    type Error = NameError;
    fn try_from(s: String) -> Result<Self, NameError> {
        Name::parse(&s)
    }
}

impl From<Name> for String {
    fn from(n: Name) -> String {
        n.0
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for Name {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, NameError> {
        Name::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_hostname_like_names() {
        for ok in ["a", "web1", "my-ve-2", "x".repeat(MAX_NAME_LEN).as_str()] {
            assert!(Name::parse(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn rejects_bad_names_with_reason() {
        assert_eq!(Name::parse(""), Err(NameError::Empty));
        assert!(matches!(Name::parse("1abc"), Err(NameError::BadStart(_))));
        assert!(matches!(Name::parse("Web"), Err(NameError::BadStart(_))));
        assert!(matches!(Name::parse("a/b"), Err(NameError::BadChar(_, '/'))));
        assert!(matches!(Name::parse("a.b"), Err(NameError::BadChar(_, '.'))));
        assert!(matches!(Name::parse("ab-"), Err(NameError::BadEnd(_))));
        assert!(matches!(
            Name::parse(&"x".repeat(MAX_NAME_LEN + 1)),
            Err(NameError::TooLong(_))
        ));
    }

    #[test]
    fn serde_rejects_invalid() {
        assert!(serde_json::from_str::<Name>("\"../etc\"").is_err());
        let n: Name = serde_json::from_str("\"ok\"").unwrap();
        assert_eq!(n.as_str(), "ok");
    }
}
