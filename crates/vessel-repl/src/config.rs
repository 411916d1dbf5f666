//! A replicated volume's record in the control store: epoch, writer, the nodes holding a
//! copy, the in-sync set and how many copies a sync needs. The store changes it only by
//! compare-and-swap; every change here is a pure function from one config to the next, so
//! the caller CASes `old -> old.without(b)?` and nothing else.
//!
//! Rules ([`VolumeConfig::validate`]): the writer is in `in_sync`, `in_sync` is a subset of
//! `replicas`, no node is listed twice, `1 <= min_replicas <= want_replicas <= 5`.
//! Within an epoch only the writer changes `in_sync`; a writer change raises the epoch.

use serde::{Deserialize, Serialize};

/// Version of the encoded [`VolumeConfig`].
pub const CONFIG_VERSION: u32 = 1;

/// Most copies a volume may ask for.
pub const MAX_REPLICAS: usize = 5;

/// A node's name as the cluster knows it.
pub type NodeId = String;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("volume config version {found} is not supported (this node reads version {expected}): upgrade this node")]
    Version { found: u32, expected: u32 },
    #[error("volume config does not decode: {reason}")]
    Decode { reason: String },
    #[error("writer {writer} is not in the in-sync set {in_sync:?}")]
    WriterNotInSync { writer: NodeId, in_sync: Vec<NodeId> },
    #[error("node {node} is in the in-sync set but holds no copy (replicas {replicas:?})")]
    InSyncNotReplica { node: NodeId, replicas: Vec<NodeId> },
    #[error("node {node} is listed twice in {list}")]
    Duplicate { node: NodeId, list: &'static str },
    #[error("min_replicas {min} and want_replicas {want} must satisfy 1 <= min <= want <= {max}")]
    Counts { min: usize, want: usize, max: usize },
    #[error("{replicas} copies listed, more than the most allowed ({max}): remove one first")]
    TooManyReplicas { replicas: usize, max: usize },
    #[error("node {node} is the writer of epoch {epoch}: change the writer before removing it")]
    RemoveWriter { node: NodeId, epoch: u64 },
    #[error("node {node} holds no copy of the volume: seed it first")]
    NotAReplica { node: NodeId },
    #[error("node {node} is not in sync: only an in-sync replica may become the writer")]
    NotInSync { node: NodeId },
}

/// The volume's record in the control store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeConfig {
    /// [`CONFIG_VERSION`].
    pub version: u32,
    /// Raised on every writer change; one writer per epoch.
    pub epoch: u64,
    /// The node that commits transactions in this epoch.
    pub writer: NodeId,
    /// Every node holding a copy, the writer included.
    pub replicas: Vec<NodeId>,
    /// Replicas that have every acknowledged transaction durably; always holds the writer.
    pub in_sync: Vec<NodeId>,
    /// A sync is acknowledged only while at least this many copies are in sync.
    pub min_replicas: usize,
    /// How many copies the control center keeps (it seeds new ones when fewer).
    pub want_replicas: usize,
}

/// The default minimum for `n` wanted copies: a majority, as Ceph's `min_size`.
pub fn default_min(n: usize) -> usize {
    n - n / 2
}

impl VolumeConfig {
    /// A new volume on `writer` alone, in epoch 1.
    pub fn new(writer: &str, min_replicas: usize, want_replicas: usize) -> Self {
        VolumeConfig {
            version: CONFIG_VERSION,
            epoch: 1,
            writer: writer.to_string(),
            replicas: vec![writer.to_string()],
            in_sync: vec![writer.to_string()],
            min_replicas,
            want_replicas,
        }
    }

    /// Decode and validate a config read from the store.
    pub fn decode(bytes: &[u8]) -> Result<Self, ConfigError> {
        #[derive(Deserialize)]
        struct Probe {
            version: u32,
        }
        let probe: Probe = serde_json::from_slice(bytes).map_err(|e| ConfigError::Decode { reason: e.to_string() })?;
        if probe.version != CONFIG_VERSION {
            return Err(ConfigError::Version {
                found: probe.version,
                expected: CONFIG_VERSION,
            });
        }
        let c: VolumeConfig =
            serde_json::from_slice(bytes).map_err(|e| ConfigError::Decode { reason: e.to_string() })?;
        c.validate()?;
        Ok(c)
    }

    /// Encode for the store (JSON).
    pub fn encode(&self) -> Vec<u8> {
        // Serializing plain strings and integers cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Check the rules in the module doc.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.version != CONFIG_VERSION {
            return Err(ConfigError::Version {
                found: self.version,
                expected: CONFIG_VERSION,
            });
        }
        no_duplicates(&self.replicas, "replicas")?;
        no_duplicates(&self.in_sync, "in_sync")?;
        if self.replicas.len() > MAX_REPLICAS {
            return Err(ConfigError::TooManyReplicas {
                replicas: self.replicas.len(),
                max: MAX_REPLICAS,
            });
        }
        if !(1 <= self.min_replicas && self.min_replicas <= self.want_replicas && self.want_replicas <= MAX_REPLICAS) {
            return Err(ConfigError::Counts {
                min: self.min_replicas,
                want: self.want_replicas,
                max: MAX_REPLICAS,
            });
        }
        if !self.in_sync.contains(&self.writer) {
            return Err(ConfigError::WriterNotInSync {
                writer: self.writer.clone(),
                in_sync: self.in_sync.clone(),
            });
        }
        if let Some(n) = self.in_sync.iter().find(|n| !self.replicas.contains(n)) {
            return Err(ConfigError::InSyncNotReplica {
                node: n.clone(),
                replicas: self.replicas.clone(),
            });
        }
        Ok(())
    }

    pub fn is_in_sync(&self, node: &str) -> bool {
        self.in_sync.iter().any(|n| n == node)
    }

    pub fn is_replica(&self, node: &str) -> bool {
        self.replicas.iter().any(|n| n == node)
    }

    /// The next config with `node` out of the in-sync set (it keeps its copy and catches
    /// up); same epoch. Removing a node not in sync changes nothing.
    pub fn without(&self, node: &str) -> Result<Self, ConfigError> {
        if self.writer == node {
            return Err(ConfigError::RemoveWriter {
                node: node.to_string(),
                epoch: self.epoch,
            });
        }
        let mut next = self.clone();
        next.in_sync.retain(|n| n != node);
        Ok(next)
    }

    /// The next config with `node` back in the in-sync set (it acknowledged everything the
    /// writer committed); same epoch.
    pub fn with_in_sync(&self, node: &str) -> Result<Self, ConfigError> {
        if !self.is_replica(node) {
            return Err(ConfigError::NotAReplica { node: node.to_string() });
        }
        let mut next = self.clone();
        if !next.is_in_sync(node) {
            next.in_sync.push(node.to_string());
        }
        Ok(next)
    }

    /// The next config with `node` holding a copy (being seeded; not in sync yet).
    pub fn with_replica(&self, node: &str) -> Result<Self, ConfigError> {
        let mut next = self.clone();
        if !next.is_replica(node) {
            next.replicas.push(node.to_string());
        }
        next.validate()?;
        Ok(next)
    }

    /// The next config with `node`'s copy gone (a lost node); same epoch.
    pub fn without_replica(&self, node: &str) -> Result<Self, ConfigError> {
        let mut next = self.without(node)?;
        next.replicas.retain(|n| n != node);
        Ok(next)
    }

    /// The next config with other copy counts (`ve set --replicas/--min-replicas`); same
    /// epoch. The writer learns it like any change; until then it decides by the old ones.
    pub fn with_counts(&self, min_replicas: usize, want_replicas: usize) -> Result<Self, ConfigError> {
        let next = VolumeConfig {
            min_replicas,
            want_replicas,
            ..self.clone()
        };
        next.validate()?;
        Ok(next)
    }

    /// The next config with `node` as writer in epoch + 1. `node` must be in sync (it has
    /// every acknowledged transaction); the in-sync set is kept: the old writer, if alive,
    /// stays a replica and is removed like any other if it does not follow.
    pub fn with_writer(&self, node: &str) -> Result<Self, ConfigError> {
        if !self.is_in_sync(node) {
            return Err(ConfigError::NotInSync { node: node.to_string() });
        }
        let mut next = self.clone();
        next.epoch += 1;
        next.writer = node.to_string();
        Ok(next)
    }
}

fn no_duplicates(list: &[NodeId], name: &'static str) -> Result<(), ConfigError> {
    for (i, n) in list.iter().enumerate() {
        if list[..i].contains(n) {
            return Err(ConfigError::Duplicate {
                node: n.clone(),
                list: name,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn abc() -> VolumeConfig {
        VolumeConfig {
            version: 1,
            epoch: 3,
            writer: "a".into(),
            replicas: vec!["a".into(), "b".into(), "c".into()],
            in_sync: vec!["a".into(), "b".into(), "c".into()],
            min_replicas: 2,
            want_replicas: 3,
        }
    }

    #[test]
    fn default_min_is_a_majority() {
        assert_eq!((1..=5).map(default_min).collect::<Vec<_>>(), vec![1, 1, 2, 2, 3]);
    }

    #[test]
    fn round_trips_and_refuses_other_versions() {
        let c = abc();
        assert_eq!(VolumeConfig::decode(&c.encode()), Ok(c.clone()));
        let mut v2 = serde_json::to_value(&c).unwrap();
        v2["version"] = 2.into();
        let e = VolumeConfig::decode(&serde_json::to_vec(&v2).unwrap()).unwrap_err();
        assert_eq!(e, ConfigError::Version { found: 2, expected: 1 });
        assert!(e.to_string().contains("upgrade this node"));
        assert!(matches!(
            VolumeConfig::decode(b"{\"version\":1}"),
            Err(ConfigError::Decode { .. })
        ));
        assert!(matches!(
            VolumeConfig::decode(b"\xff garbage"),
            Err(ConfigError::Decode { .. })
        ));
    }

    #[test]
    fn validate_names_the_broken_rule() {
        let mut c = abc();
        c.in_sync = vec!["b".into()];
        assert!(matches!(c.validate(), Err(ConfigError::WriterNotInSync { .. })));
        let mut c = abc();
        c.in_sync.push("d".into());
        assert_eq!(
            c.validate(),
            Err(ConfigError::InSyncNotReplica {
                node: "d".into(),
                replicas: abc().replicas
            })
        );
        let mut c = abc();
        c.replicas.push("b".into());
        assert_eq!(
            c.validate(),
            Err(ConfigError::Duplicate {
                node: "b".into(),
                list: "replicas"
            })
        );
        for (min, want) in [(0, 3), (4, 3), (2, 6)] {
            let mut c = abc();
            (c.min_replicas, c.want_replicas) = (min, want);
            assert!(matches!(c.validate(), Err(ConfigError::Counts { .. })), "{min} {want}");
        }
        let mut c = abc();
        c.replicas = (0..6).map(|i| i.to_string()).collect();
        c.writer = "0".into();
        c.in_sync = vec!["0".into()];
        assert!(matches!(c.validate(), Err(ConfigError::TooManyReplicas { .. })));
        assert_eq!(abc().validate(), Ok(()));
    }

    #[test]
    fn in_sync_changes_keep_the_epoch() {
        let c = abc();
        let out = c.without("b").unwrap();
        assert_eq!(out.in_sync, vec!["a".to_string(), "c".into()]);
        assert_eq!(out.replicas, c.replicas);
        assert_eq!(out.epoch, 3);
        assert_eq!(out.without("b").unwrap(), out);
        let back = out.with_in_sync("b").unwrap();
        assert_eq!(back.in_sync, vec!["a".to_string(), "c".into(), "b".into()]);
        assert_eq!(back.epoch, 3);
        assert_eq!(
            c.without("a"),
            Err(ConfigError::RemoveWriter {
                node: "a".into(),
                epoch: 3
            })
        );
        assert_eq!(c.with_in_sync("d"), Err(ConfigError::NotAReplica { node: "d".into() }));
        let gone = c.without_replica("c").unwrap();
        assert_eq!(gone.replicas, vec!["a".to_string(), "b".into()]);
        assert_eq!(gone.in_sync, vec!["a".to_string(), "b".into()]);
        assert_eq!(gone.with_replica("d").unwrap().replicas.len(), 3);
    }

    #[test]
    fn writer_change_raises_the_epoch_and_needs_an_in_sync_node() {
        let c = abc().without("c").unwrap();
        let moved = c.with_writer("b").unwrap();
        assert_eq!((moved.epoch, moved.writer.as_str()), (4, "b"));
        assert_eq!(moved.in_sync, c.in_sync);
        assert_eq!(moved.validate(), Ok(()));
        assert_eq!(c.with_writer("c"), Err(ConfigError::NotInSync { node: "c".into() }));
        // The same node again (a writer that restarted): a new epoch all the same.
        assert_eq!(c.with_writer("a").unwrap().epoch, 4);
    }

    #[test]
    fn counts_change_within_the_epoch_and_are_checked() {
        let c = abc().with_counts(1, 2).unwrap();
        assert_eq!((c.min_replicas, c.want_replicas, c.epoch), (1, 2, 3));
        assert_eq!(
            abc().with_counts(3, 2),
            Err(ConfigError::Counts {
                min: 3,
                want: 2,
                max: 5
            })
        );
    }
}
