//! Where a volume's further copies go: nodes that are ready and hold no copy of it yet,
//! those that have the VE's template first (no fetch before seeding), then those holding
//! the fewest copies of any volume (spreading), then by name (the same inputs always give
//! the same answer). A copy never goes to a node that has one: copies are on distinct
//! nodes, or they are not copies against a node's loss.

use crate::model::{Node, NodeState};
use std::collections::BTreeMap;

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
