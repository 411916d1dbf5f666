//! The partition ruleset, pure: one `table inet <prefix>_part` in a node's network
//! namespace that drops every packet to or from the peers it is cut off from. Written whole
//! with `nft -f -` (one transaction: the table is replaced, never half there).

use std::net::Ipv4Addr;

/// The `nft -f -` script that makes `table` hold exactly a drop of `peers` (none: the table
/// is removed). Input and output are both cut, so the partition is symmetric even though
/// only one side holds rules.
pub fn render(table: &str, peers: &[Ipv4Addr]) -> String {
    // `add` then `delete` removes a table that may or may not exist, in the same transaction.
    let mut s = format!("add table inet {table}\ndelete table inet {table}\n");
    if peers.is_empty() {
        return s;
    }
    let set = peers.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(", ");
    s.push_str(&format!(
        "table inet {table} {{\n\
         \tchain input {{\n\t\ttype filter hook input priority -300; policy accept;\n\t\tip saddr {{ {set} }} drop\n\t}}\n\
         \tchain output {{\n\t\ttype filter hook output priority -300; policy accept;\n\t\tip daddr {{ {set} }} drop\n\t}}\n\
         }}\n"
    ));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drops_both_ways_and_replaces_the_table_whole() {
        let peers = [Ipv4Addr::new(10, 160, 0, 2), Ipv4Addr::new(10, 160, 0, 3)];
        let s = render("vl00000_part", &peers);
        assert!(s.starts_with("add table inet vl00000_part\ndelete table inet vl00000_part\ntable inet vl00000_part {"));
        assert!(s.contains(
            "type filter hook input priority -300; policy accept;\n\t\tip saddr { 10.160.0.2, 10.160.0.3 } drop"
        ));
        assert!(s.contains(
            "type filter hook output priority -300; policy accept;\n\t\tip daddr { 10.160.0.2, 10.160.0.3 } drop"
        ));
        assert_eq!(s.matches("drop").count(), 2);
    }

    #[test]
    fn no_peers_removes_the_table() {
        assert_eq!(render("t", &[]), "add table inet t\ndelete table inet t\n");
    }
}
