//! Joining a cluster (`vessel up --join HOST:PORT --token T`, `vessel cluster join`), run
//! on the new node before its daemon starts: make the node's key and a certificate
//! request, reach the serving node over TLS trusting it only through the CA pin in the
//! token, send the join, then keep the answer: the CA and node certificates under
//! `ROOT/cluster/` and the cluster's etcd in the node config (`[cluster] etcd`, and the
//! node's `name` so that it stays the one in its certificate).

use crate::config::ConfigFile;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::Path;
use std::time::Duration;
use vessel_peer::ca::{self, CertKey, ClusterFiles};
use vessel_peer::token::Token;
use vessel_peer::wire::{JoinRequest, PeerRequest, PeerResponse};
use vessel_peer::PeerClient;

/// How long the join may take (connect, handshake, the serving node's checks).
const JOIN_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug)]
pub struct Joined {
    pub name: String,
    /// The node that admitted this one.
    pub by: String,
    pub etcd: Vec<String>,
}

/// Join through the node at `target` (HOST:PORT) with `token`. Nothing is written unless
/// the serving node admitted this one.
pub fn join(root: &Path, config: &ConfigFile, target: &str, token: &str) -> Result<Joined, String> {
    let files = ClusterFiles::new(root);
    if files.initialized() {
        return Err(format!(
            "this node is already in a cluster ({} exists); to join another, remove {} first (the node leaves its cluster)",
            files.ca_cert().display(),
            files.dir.display()
        ));
    }
    let settings = crate::config::load(config).map_err(|e| e.to_string())?;
    let token = Token::parse(token).map_err(|e| e.to_string())?;
    let addr: SocketAddr = target
        .to_socket_addrs()
        .map_err(|e| {
            format!("join address {target}: {e}; give it as HOST:PORT (the port `vessel cluster init` printed)")
        })?
        .next()
        .ok_or_else(|| format!("join address {target}: no address found"))?;
    let name = settings.cluster.name.clone().unwrap_or_else(crate::cluster::hostname);
    let address = settings.cluster.peer_address();
    let (key_pem, csr_pem) = ca::node_key_and_csr(&name, address).map_err(|e| e.to_string())?;
    let tls = vessel_peer::tls::join_client_config(token.pin).map_err(|e| e.to_string())?;
    let mut c = PeerClient::connect_node(addr, tls, JOIN_TIMEOUT).map_err(|e| e.to_string())?;
    let req = PeerRequest::Join(JoinRequest {
        token: token.wire(),
        name: name.clone(),
        address,
        csr_pem,
    });
    let reply = match c.call(&req).map_err(|e| format!("joining through {addr}: {e}"))? {
        PeerResponse::Joined(r) => r,
        r => return Err(format!("joining through {addr}: unexpected answer {r:?}")),
    };
    // The answer must be what was asked for: signed by the pinned CA, for this key.
    if ca::pin(&reply.ca_pem).map_err(|e| e.to_string())? != token.pin {
        return Err(format!("{addr} answered with another CA than the token's: not joined"));
    }
    files
        .save(
            &reply.ca_pem,
            None,
            &CertKey {
                cert_pem: reply.cert_pem,
                key_pem,
            },
        )
        .map_err(|e| format!("saving the cluster's certificates: {e}"))?;
    write_cluster_config(&config.path, Some(&name), &reply.etcd)
        .map_err(|e| format!("writing the cluster's etcd to {}: {e}", config.path.display()))?;
    Ok(Joined {
        name,
        by: reply.by,
        etcd: reply.etcd,
    })
}

/// Set `[cluster] name` (if given) and `etcd` in the node config, keeping everything else
/// (comments too). A missing file is made.
pub fn write_cluster_config(path: &Path, name: Option<&str>, etcd: &[String]) -> Result<(), String> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            format!("version = {}\n", vessel_types::config::CONFIG_VERSION)
        }
        Err(e) => return Err(e.to_string()),
    };
    let text = set_cluster_keys(&text, name, etcd)?;
    // Still a valid config.
    vessel_types::config::parse(&text).map_err(|e| e.to_string())?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    }
    ca::write_atomic(path, text.as_bytes()).map_err(|e| e.to_string())
}

/// The config text with `[cluster] name` and `etcd` set. Pure.
pub fn set_cluster_keys(text: &str, name: Option<&str>, etcd: &[String]) -> Result<String, String> {
    let mut doc: toml_edit::DocumentMut = text.parse().map_err(|e: toml_edit::TomlError| e.to_string())?;
    let cluster = doc
        .entry("cluster")
        .or_insert_with(|| toml_edit::Item::Table(toml_edit::Table::new()))
        .as_table_mut()
        .ok_or("[cluster] is not a table")?;
    if let Some(name) = name {
        cluster["name"] = toml_edit::value(name);
    }
    let mut urls = toml_edit::Array::new();
    for u in etcd {
        urls.push(u.as_str());
    }
    cluster["etcd"] = toml_edit::value(urls);
    Ok(doc.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_keeps_what_it_had_and_gets_the_cluster() {
        let before =
            "version = 1\n# the operator's note\n[defaults]\nmemory = \"1G\"\n[cluster]\naddress = \"10.0.0.5\"\n";
        let after = set_cluster_keys(before, Some("b"), &["http://10.0.0.1:2379".into()]).unwrap();
        assert!(after.contains("# the operator's note"), "{after}");
        let s = vessel_types::config::parse(&after).unwrap();
        assert_eq!(s.cluster.name.as_deref(), Some("b"));
        assert_eq!(s.cluster.etcd, vec!["http://10.0.0.1:2379"]);
        assert_eq!(s.cluster.address, Some("10.0.0.5".parse::<std::net::IpAddr>().unwrap()));
        assert_eq!(s.limits.defaults.memory_max, Some(1 << 30));
        let fresh = set_cluster_keys("version = 1\n", Some("c"), &["http://127.0.0.1:1".into()]).unwrap();
        assert_eq!(
            vessel_types::config::parse(&fresh).unwrap().cluster.name.as_deref(),
            Some("c")
        );
        assert!(set_cluster_keys("version = 1\ncluster = 3\n", None, &[]).is_err());
    }
}
