//! Where a volume's further copies go: nodes that are ready and hold no copy of it yet,
//! those that have the VE's template first (no fetch before seeding), then those holding
//! the fewest copies of any volume (spreading), then by name (the same inputs always give
//! the same answer). A copy never goes to a node that has one: copies are on distinct
//! nodes, or they are not copies against a node's loss.

//!
//! A copy on a node that is lost (its lease expired, or no longer a member) is dropped from
//! the volume's record once the node has been lost for a grace period ([`lost_since`],
//! [`to_drop`]); [`pick`] then finds its replacement.

use crate::model::{Node, NodeState};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// Since when each holder of a copy (the writer aside) has been lost, carried over from
/// `prev` (the previous round's answer) and started at `now` for a newly lost one. A node
/// that is not a member any more counts as lost; a node back (ready or draining) drops out.
pub fn lost_since(
    prev: &BTreeMap<String, Instant>,
    nodes: &[Node],
    holders: &[String],
    writer: &str,
    now: Instant,
) -> BTreeMap<String, Instant> {
    holders
        .iter()
        .filter(|h| *h != writer)
        .filter(|h| {
            nodes
                .iter()
                .find(|n| &n.name == *h)
                .is_none_or(|n| n.state == NodeState::Lost)
        })
        .map(|h| (h.clone(), prev.get(h).copied().unwrap_or(now)))
        .collect()
}

/// The holders lost for at least `grace`: their copies leave the record.
pub fn to_drop(lost: &BTreeMap<String, Instant>, now: Instant, grace: Duration) -> Vec<String> {
    lost.iter()
        .filter(|(_, since)| now.saturating_duration_since(**since) >= grace)
        .map(|(n, _)| n.clone())
        .collect()
}

/// Up to `want - holders.len()` nodes for new copies of a volume held by `holders`.
/// `copies` counts the copies of all volumes per node.
pub fn pick(
    nodes: &[Node],
    holders: &[String],
    want: usize,
    template: &str,
    copies: &BTreeMap<String, usize>,
) -> Vec<String> {
    let need = want.saturating_sub(holders.len());
    let mut cands: Vec<&Node> = nodes
        .iter()
        .filter(|n| n.state == NodeState::Ready && !holders.contains(&n.name))
        .collect();
    cands.sort_by_key(|n| {
        let has_template = n.templates.as_ref().is_none_or(|t| t.contains(template));
        (!has_template, copies.get(&n.name).copied().unwrap_or(0), n.name.clone())
    });
    cands.into_iter().take(need).map(|n| n.name.clone()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Resources;

    #[test]
    fn a_lost_copy_is_dropped_after_the_grace_and_one_back_in_time_is_kept() {
        let t0 = Instant::now();
        let grace = Duration::from_secs(10);
        let holders: Vec<String> = ["w", "a", "b"].iter().map(|s| s.to_string()).collect();
        let mut nodes = vec![
            node("w", NodeState::Lost, &[]),
            node("a", NodeState::Lost, &[]),
            node("b", NodeState::Draining, &[]),
        ];
        // The writer is never counted (failover is another matter); a draining node is alive.
        let l = lost_since(&BTreeMap::new(), &nodes, &holders, "w", t0);
        assert_eq!(l, BTreeMap::from([("a".to_string(), t0)]));
        assert!(to_drop(&l, t0 + Duration::from_secs(9), grace).is_empty());
        // Still lost a round later: since the first round, not the second.
        let t1 = t0 + Duration::from_secs(10);
        let l = lost_since(&l, &nodes, &holders, "w", t1);
        assert_eq!(l["a"], t0);
        assert_eq!(to_drop(&l, t1, grace), vec!["a".to_string()]);
        // Back before the grace: kept, and lost again it starts over.
        nodes[1].state = NodeState::Ready;
        let l = lost_since(&l, &nodes, &holders, "w", t1);
        assert!(l.is_empty());
        nodes[1].state = NodeState::Lost;
        let t2 = t1 + Duration::from_secs(1);
        let l = lost_since(&l, &nodes, &holders, "w", t2);
        assert!(to_drop(&l, t2 + Duration::from_secs(5), grace).is_empty());
        // A holder that is no member any more (removed from the cluster) is lost too.
        nodes.remove(2);
        let l = lost_since(&l, &nodes, &holders, "w", t2);
        assert_eq!(l.keys().cloned().collect::<Vec<_>>(), vec!["a".to_string(), "b".into()]);
    }

    fn node(name: &str, state: NodeState, templates: &[&str]) -> Node {
        Node {
            name: name.into(),
            state,
            allocatable: Resources::default(),
            labels: Default::default(),
            templates: Some(templates.iter().map(|s| s.to_string()).collect()),
        }
    }

    #[test]
    fn copies_go_to_distinct_ready_nodes_with_the_template_first_then_the_least_loaded() {
        let nodes = vec![
            node("a", NodeState::Ready, &["deb"]),
            node("b", NodeState::Ready, &[]),
            node("c", NodeState::Ready, &["deb"]),
            node("d", NodeState::Lost, &["deb"]),
            node("e", NodeState::Draining, &["deb"]),
            node("f", NodeState::Ready, &["deb"]),
        ];
        let copies = BTreeMap::from([("c".to_string(), 3), ("f".to_string(), 1)]);
        // a holds it; two more wanted: f (template, 1 copy), c (template, 3 copies).
        assert_eq!(pick(&nodes, &["a".into()], 3, "deb", &copies), vec!["f", "c"]);
        // Three more: then b, which lacks the template.
        assert_eq!(pick(&nodes, &["a".into()], 4, "deb", &copies), vec!["f", "c", "b"]);
        // Enough copies already: nothing.
        assert!(pick(&nodes, &["a".into(), "b".into()], 2, "deb", &copies).is_empty());
        // Never a lost or draining node, even when short.
        assert_eq!(
            pick(
                &nodes,
                &["a".into(), "b".into(), "c".into(), "f".into()],
                5,
                "deb",
                &copies
            ),
            Vec::<String>::new()
        );
    }
}
