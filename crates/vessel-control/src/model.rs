//! What the control center's decisions read.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Amounts of what a VE asks for and a node offers. CPU in thousandths of a CPU; memory
/// and disk in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resources {
    pub cpu_milli: u64,
    pub memory: u64,
    pub disk: u64,
}

impl Resources {
    pub fn plus(self, o: Resources) -> Resources {
        Resources {
            cpu_milli: self.cpu_milli.saturating_add(o.cpu_milli),
            memory: self.memory.saturating_add(o.memory),
            disk: self.disk.saturating_add(o.disk),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeState {
    /// Holds its lease and takes new VEs.
    Ready,
    /// Holds its lease; its VEs are moved elsewhere and it takes no new ones.
    Draining,
    /// Its lease expired.
    Lost,
}

impl NodeState {
    /// A member's state from whether its lease lives and the operator's draining mark.
    pub fn of(alive: bool, draining: bool) -> NodeState {
        match (alive, draining) {
            (false, _) => NodeState::Lost,
            (true, true) => NodeState::Draining,
            (true, false) => NodeState::Ready,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Ready => "ready",
            NodeState::Draining => "draining",
            NodeState::Lost => "lost",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Node {
    pub name: String,
    pub state: NodeState,
    /// What VEs may ask for in total on this node (before overcommit).
    pub allocatable: Resources,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The templates it has (None: not known, taken as any).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub templates: Option<std::collections::BTreeSet<String>>,
}

/// What the scheduler needs to know about a VE.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ve {
    pub name: String,
    /// Bumped by every change of the spec.
    pub generation: u64,
    /// What it asks for (its memory and CPU caps are limits, not requests; a VE without
    /// a request asks for nothing and shares what is free).
    pub requests: Resources,
    /// Only this node (`--node`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Only nodes with all these labels (`--label k=v`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// The template it is made from: nodes that have it are preferred (the others fetch it
    /// from a node that has it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
}

/// How far requests may exceed what a node has (CPU is shared by time; memory is only
/// reserved, VEs have no dedicated RAM). Disk is never overcommitted.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Policy {
    pub cpu_overcommit: f64,
    pub memory_overcommit: f64,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            cpu_overcommit: 4.0,
            memory_overcommit: 1.5,
        }
    }
}

/// The cluster as the leader sees it: nodes, VEs, and where each placed VE is.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    pub nodes: Vec<Node>,
    pub ves: Vec<Ve>,
    /// VE name → node name.
    pub placements: BTreeMap<String, String>,
}
