//! What a VE is (its spec, set by the user) and where it is in its life (its status).
//!
//! ```text
//!            create            start              init exits / stop
//!   (none) ─────────▶ Stopped ───────▶ Running ───────────────────▶ Stopped
//!                       │  ▲             │  restart policy: start again
//!                       │  └─────────────┘
//!                       │ destroy
//!                       ▼
//!                    (none)
//! ```
//! `Failed` is a Stopped VE whose last start or run ended in an error; it may be started again.

use crate::{Ipv4Cidr, Limits, Name};
use serde::{Deserialize, Serialize};

/// Everything the user chose about a VE. Persisted by the node and sent over the API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VeSpec {
    pub name: Name,
    pub template: Name,
    #[serde(default)]
    pub limits: Limits,
    /// Hostname inside the VE; defaults to the VE name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// Address of the VE's eth0; allocated from the node subnet when absent at create.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<Ipv4Cidr>,
    /// crypt(3) hash for root in /etc/shadow (e.g. from `openssl passwd -6`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_password_hash: Option<String>,
    /// Lines for /root/.ssh/authorized_keys.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ssh_keys: Vec<String>,
    /// Environment of the VE's init, as `KEY=VALUE`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<String>,
    #[serde(default)]
    pub restart: RestartPolicy,
    /// DNS servers written to /etc/resolv.conf.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns: Vec<String>,
    /// Copies of the VE's volume on distinct nodes (1-5). A create in a cluster sets it
    /// ([`VeSpec::default_replicas`]: two with 2+ nodes) so it does not change later;
    /// `None` (a VE made before, or on a node in no cluster): one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<u8>,
    /// In-sync copies a sync needs before it is acknowledged (`None`: N - N/2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_replicas: Option<u8>,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SpecError {
    #[error(transparent)]
    Limits(#[from] crate::limits::LimitsError),
    #[error("hostname '{0}' is not a valid hostname (letters, digits, '-' and '.', at most 64)")]
    Hostname(String),
    #[error("environment entry '{0}' must look like KEY=VALUE")]
    Env(String),
    #[error("root password hash must be a crypt(3) string starting with '$' (e.g. from `openssl passwd -6`)")]
    PasswordHash,
    #[error("ssh key line '{0}' does not look like an OpenSSH public key")]
    SshKey(String),
    #[error("dns server '{0}' is not an IP address")]
    Dns(String),
    #[error("--replicas {0} is out of range: a VE's volume has 1 to 5 copies")]
    Replicas(u8),
    #[error("--min-replicas {min} must be between 1 and the number of copies ({replicas})")]
    MinReplicas { min: u8, replicas: u8 },
}

impl VeSpec {
    pub fn new(name: Name, template: Name) -> Self {
        VeSpec {
            name,
            template,
            limits: Limits::default(),
            hostname: None,
            ip: None,
            root_password_hash: None,
            ssh_keys: Vec::new(),
            env: Vec::new(),
            restart: RestartPolicy::default(),
            dns: Vec::new(),
            replicas: None,
            min_replicas: None,
        }
    }

    pub fn validate(&self) -> Result<(), SpecError> {
        self.limits.validate()?;
        if let Some(h) = &self.hostname {
            validate_hostname(h)?;
        }
        for e in &self.env {
            match e.split_once('=') {
                Some((k, _))
                    if !k.is_empty()
                        && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                        && !k.starts_with(|c: char| c.is_ascii_digit()) => {}
                _ => return Err(SpecError::Env(e.clone())),
            }
        }
        if let Some(h) = &self.root_password_hash {
            if !h.starts_with('$') || h.contains([':', '\n']) {
                return Err(SpecError::PasswordHash);
            }
        }
        for k in &self.ssh_keys {
            let ok = k.split_whitespace().count() >= 2
                && !k.contains('\n')
                && (k.starts_with("ssh-") || k.starts_with("ecdsa-") || k.starts_with("sk-"));
            if !ok {
                return Err(SpecError::SshKey(k.chars().take(40).collect()));
            }
        }
        for d in &self.dns {
            if d.parse::<std::net::IpAddr>().is_err() {
                return Err(SpecError::Dns(d.clone()));
            }
        }
        if let Some(n) = self.replicas {
            if !(1..=5).contains(&n) {
                return Err(SpecError::Replicas(n));
            }
        }
        if let Some(min) = self.min_replicas {
            let replicas = self.replicas.unwrap_or(5);
            if min < 1 || min > replicas {
                return Err(SpecError::MinReplicas { min, replicas });
            }
        }
        Ok(())
    }

    pub fn hostname(&self) -> &str {
        self.hostname.as_deref().unwrap_or(self.name.as_str())
    }

    /// The copies a VE created without `--replicas` gets in a cluster of `nodes` members:
    /// two with two or more (a node's loss loses no acknowledged write, and `ve move`
    /// is a writer change), one on a lone node.
    pub fn default_replicas(nodes: usize) -> u8 {
        if nodes >= 2 {
            2
        } else {
            1
        }
    }

    /// The in-sync copies a sync needs, for `replicas` copies (Ceph's min_size rule).
    pub fn min_replicas_of(&self, replicas: u8) -> u8 {
        self.min_replicas
            .unwrap_or(replicas - replicas / 2)
            .min(replicas)
            .max(1)
    }
}

pub fn validate_hostname(h: &str) -> Result<(), SpecError> {
    let ok = !h.is_empty()
        && h.len() <= 64
        && h.split('.').all(|l| {
            !l.is_empty()
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        });
    if ok {
        Ok(())
    } else {
        Err(SpecError::Hostname(h.to_string()))
    }
}

/// What the node does when a VE's init exits on its own (not by `vessel ve stop`), and
/// whether it starts the VE when the node starts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    /// Never restart by itself.
    No,
    /// Restart when init exits with an error or a signal.
    OnFailure,
    /// Restart whenever init exits, and start with the node, unless stopped by the user.
    #[default]
    Always,
}

impl std::str::FromStr for RestartPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "no" => Ok(RestartPolicy::No),
            "on-failure" => Ok(RestartPolicy::OnFailure),
            "always" => Ok(RestartPolicy::Always),
            _ => Err(format!("restart policy '{s}' is not one of: no, on-failure, always")),
        }
    }
}

impl RestartPolicy {
    /// Pure decision: restart a VE whose init ended with `exit` (None = killed by signal)?
    /// `user_stopped` is true when the user asked for the stop.
    pub fn should_restart(self, exit: Option<i32>, user_stopped: bool) -> bool {
        if user_stopped {
            return false;
        }
        match self {
            RestartPolicy::No => false,
            RestartPolicy::OnFailure => exit != Some(0),
            RestartPolicy::Always => true,
        }
    }
}

/// Lifecycle state of a VE on its node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VeStatus {
    Stopped,
    Running,
    Failed,
    /// In the cluster's desired state but on no node yet (no node fits it, or no leader).
    Pending,
}

impl VeStatus {
    pub fn can_start(self) -> bool {
        matches!(self, VeStatus::Stopped | VeStatus::Failed)
    }
    pub fn can_stop(self) -> bool {
        self == VeStatus::Running
    }
    pub fn can_exec(self) -> bool {
        self == VeStatus::Running
    }
    pub fn as_str(self) -> &'static str {
        match self {
            VeStatus::Stopped => "stopped",
            VeStatus::Running => "running",
            VeStatus::Failed => "failed",
            VeStatus::Pending => "pending",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_copies_by_default_on_a_cluster_one_on_a_lone_node() {
        assert_eq!(
            (0..=4).map(VeSpec::default_replicas).collect::<Vec<_>>(),
            vec![1, 1, 2, 2, 2]
        );
    }

    fn spec() -> VeSpec {
        VeSpec::new(Name::parse("web").unwrap(), Name::parse("busybox").unwrap())
    }

    #[test]
    fn status_transitions() {
        assert!(VeStatus::Stopped.can_start());
        assert!(VeStatus::Failed.can_start());
        assert!(!VeStatus::Running.can_start());
        assert!(VeStatus::Running.can_stop() && VeStatus::Running.can_exec());
        assert!(!VeStatus::Stopped.can_exec());
    }

    #[test]
    fn restart_decisions() {
        use RestartPolicy::*;
        assert!(!No.should_restart(Some(1), false));
        assert!(OnFailure.should_restart(Some(1), false));
        assert!(OnFailure.should_restart(None, false));
        assert!(!OnFailure.should_restart(Some(0), false));
        assert!(Always.should_restart(Some(0), false));
        assert!(!Always.should_restart(Some(1), true));
    }

    #[test]
    fn spec_validation() {
        let mut s = spec();
        assert!(s.validate().is_ok());
        assert_eq!(s.hostname(), "web");
        s.hostname = Some("bad_host".into());
        assert!(matches!(s.validate(), Err(SpecError::Hostname(_))));
        s.hostname = Some("web.example.com".into());
        assert!(s.validate().is_ok());
        s.env = vec!["NOEQ".into()];
        assert!(matches!(s.validate(), Err(SpecError::Env(_))));
        s.env = vec!["A_B=c=d".into()];
        assert!(s.validate().is_ok());
        s.root_password_hash = Some("plain".into());
        assert_eq!(s.validate(), Err(SpecError::PasswordHash));
        s.root_password_hash = Some("$6$salt$hash".into());
        s.ssh_keys = vec!["not a key".into()];
        assert!(matches!(s.validate(), Err(SpecError::SshKey(_))));
        s.ssh_keys = vec!["ssh-ed25519 AAAAC3Nza user@host".into()];
        s.dns = vec!["1.1.1.1".into()];
        assert!(s.validate().is_ok());
    }
}
