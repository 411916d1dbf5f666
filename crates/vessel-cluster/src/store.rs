//! The control store as the node daemon uses it: registration under a lease, the
//! leader election, writes guarded by leadership, and reads of the key layout.

use crate::keys::{self, NodeRecord};
use crate::ClusterError;
use etcd_client::{Client, Compare, CompareOp, ConnectOptions, GetOptions, LeaderKey, PutOptions, Txn, TxnOp};
use serde::{de::DeserializeOwned, Serialize};
use std::time::Duration;
use tokio::sync::watch;

/// A connection to the control store.
#[derive(Clone)]
pub struct Store {
    client: Client,
    endpoints: String,
}

/// A node's registration: its lease is kept alive until this is dropped (or etcd stops
/// answering: `alive` turns false, and the node must stop acting for the cluster).
pub struct Registration {
    pub lease: i64,
    pub ttl: Duration,
    pub alive: watch::Receiver<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Being the control center's leader. Writes made through [`Store::put_as_leader`] succeed
/// only while this leadership holds (its election key still exists with its revision).
#[derive(Debug, Clone)]
pub struct Leadership {
    key: LeaderKey,
}

impl Leadership {
    /// The election revision: grows with every new leader.
    pub fn revision(&self) -> i64 {
        self.key.rev()
    }
}

/// A node's TLS identity for an etcd that requires client certificates (PEM).
#[derive(Clone)]
pub struct StoreTls {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl Store {
    pub async fn connect(endpoints: &[String]) -> Result<Store, ClusterError> {
        Self::connect_with(endpoints, None).await
    }

    /// Connect; `tls` is used for `https://` endpoints (the server verified against its CA,
    /// this node's certificate presented).
    pub async fn connect_with(endpoints: &[String], tls: Option<&StoreTls>) -> Result<Store, ClusterError> {
        let joined = endpoints.join(",");
        let mut opts = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(3))
            .with_timeout(Duration::from_secs(5));
        // (etcd-client refuses TLS options for http:// endpoints.)
        let https = endpoints.iter().any(|e| e.starts_with("https://"));
        if let Some(t) = tls.filter(|_| https) {
            opts = opts.with_tls(
                etcd_client::TlsOptions::new()
                    .ca_certificate(etcd_client::Certificate::from_pem(&t.ca_pem))
                    .identity(etcd_client::Identity::from_pem(&t.cert_pem, &t.key_pem)),
            );
        }
        let client = Client::connect(endpoints, Some(opts))
            .await
            .map_err(|source| ClusterError::Etcd {
                endpoints: joined.clone(),
                source,
            })?;
        Ok(Store {
            client,
            endpoints: joined,
        })
    }

    fn err(&self) -> impl FnOnce(etcd_client::Error) -> ClusterError + '_ {
        move |source| ClusterError::Etcd {
            endpoints: self.endpoints.clone(),
            source,
        }
    }

    /// Put the node's record under a new lease of `ttl` and keep the lease alive (three
    /// keep-alives per TTL).
    pub async fn register(&self, rec: &NodeRecord, ttl: Duration) -> Result<Registration, ClusterError> {
        let mut c = self.client.clone();
        let secs = ttl.as_secs().max(1) as i64;
        let lease = c.lease_grant(secs, None).await.map_err(self.err())?.id();
        c.put(
            keys::node(&rec.name),
            keys::encode(rec),
            Some(PutOptions::new().with_lease(lease)),
        )
        .await
        .map_err(self.err())?;
        let (mut keeper, mut stream) = c.lease_keep_alive(lease).await.map_err(self.err())?;
        let (tx, rx) = watch::channel(true);
        let every = Duration::from_millis((secs as u64 * 1000 / 3).max(100));
        let task = tokio::spawn(async move {
            loop {
                let ok = async {
                    keeper.keep_alive().await.ok()?;
                    let r = tokio::time::timeout(every, stream.message()).await.ok()?.ok()??;
                    (r.ttl() > 0).then_some(())
                }
                .await
                .is_some();
                if !ok {
                    let _ = tx.send(false);
                    return;
                }
                tokio::time::sleep(every).await;
            }
        });
        Ok(Registration {
            lease,
            ttl: Duration::from_secs(secs as u64),
            alive: rx,
            task,
        })
    }

    /// Every registered node (those whose lease is alive).
    pub async fn nodes(&self) -> Result<Vec<NodeRecord>, ClusterError> {
        self.list(&keys::nodes()).await
    }

    /// The values under `prefix`, decoded.
    pub async fn list<T: DeserializeOwned>(&self, prefix: &str) -> Result<Vec<T>, ClusterError> {
        let r = self
            .client
            .clone()
            .get(prefix, Some(GetOptions::new().with_prefix()))
            .await
            .map_err(self.err())?;
        r.kvs()
            .iter()
            .map(|kv| keys::decode(&String::from_utf8_lossy(kv.key()), kv.value()))
            .collect()
    }

    pub async fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, ClusterError> {
        let r = self.client.clone().get(key, None).await.map_err(self.err())?;
        r.kvs().first().map(|kv| keys::decode(key, kv.value())).transpose()
    }

    /// Wait until this node is the control center's leader (`lease`: its registration's,
    /// so leadership ends when the node's lease does).
    pub async fn campaign(&self, node: &str, lease: i64) -> Result<Leadership, ClusterError> {
        let r = self
            .client
            .clone()
            .campaign(keys::election(), node, lease)
            .await
            .map_err(self.err())?;
        let key = r.leader().cloned().ok_or_else(|| ClusterError::Value {
            key: keys::election(),
            reason: "the election answered without a leader key".into(),
        })?;
        Ok(Leadership { key })
    }

    /// The current leader's name, if any.
    pub async fn leader(&self) -> Result<Option<String>, ClusterError> {
        match self.client.clone().leader(keys::election()).await {
            Ok(r) => Ok(r.kv().map(|kv| String::from_utf8_lossy(kv.value()).into_owned())),
            // etcd answers "election: no leader" as an error.
            Err(etcd_client::Error::GRpcStatus(s)) if s.message().contains("no leader") => Ok(None),
            Err(e) => Err(self.err()(e)),
        }
    }

    /// Write `value` at `key` only if `l` is still the leadership (a transaction comparing
    /// the election key's creation revision): a deposed leader's write fails with
    /// [`ClusterError::NotLeader`].
    pub async fn put_as_leader<T: Serialize>(&self, l: &Leadership, key: &str, value: &T) -> Result<(), ClusterError> {
        self.txn_as_leader(l, vec![TxnOp::put(key, keys::encode(value), None)])
            .await
    }

    pub async fn delete_as_leader(&self, l: &Leadership, key: &str) -> Result<(), ClusterError> {
        self.txn_as_leader(l, vec![TxnOp::delete(key, None)]).await
    }

    async fn txn_as_leader(&self, l: &Leadership, ops: Vec<TxnOp>) -> Result<(), ClusterError> {
        let txn = Txn::new()
            .when(vec![Compare::create_revision(
                l.key.key(),
                CompareOp::Equal,
                l.key.rev(),
            )])
            .and_then(ops);
        let r = self.client.clone().txn(txn).await.map_err(self.err())?;
        if r.succeeded() {
            Ok(())
        } else {
            Err(ClusterError::NotLeader)
        }
    }

    /// Write a value any node may write (its own status, a VE spec from the CLI).
    pub async fn put<T: Serialize>(&self, key: &str, value: &T) -> Result<(), ClusterError> {
        self.client
            .clone()
            .put(key, keys::encode(value), None)
            .await
            .map_err(self.err())?;
        Ok(())
    }

    /// The value at `key` and its `mod_revision` (for [`Store::put_if_rev`]).
    pub async fn get_rev<T: DeserializeOwned>(&self, key: &str) -> Result<Option<(T, i64)>, ClusterError> {
        let r = self.client.clone().get(key, None).await.map_err(self.err())?;
        r.kvs()
            .first()
            .map(|kv| Ok((keys::decode(key, kv.value())?, kv.mod_revision())))
            .transpose()
    }

    /// Write `value` at `key` only if the key was not changed since its `mod_revision` was
    /// `rev` (one transaction); false if it was.
    pub async fn put_if_rev<T: Serialize>(&self, key: &str, value: &T, rev: i64) -> Result<bool, ClusterError> {
        let txn = Txn::new()
            .when(vec![Compare::mod_revision(key, CompareOp::Equal, rev)])
            .and_then(vec![TxnOp::put(key, keys::encode(value), None)]);
        let r = self.client.clone().txn(txn).await.map_err(self.err())?;
        Ok(r.succeeded())
    }

    /// Delete a key any node may delete (a removed member's record).
    pub async fn delete(&self, key: &str) -> Result<(), ClusterError> {
        self.client.clone().delete(key, None).await.map_err(self.err())?;
        Ok(())
    }

    /// End a lease now (a node leaving: its record and leadership go at once).
    pub async fn revoke(&self, lease: i64) -> Result<(), ClusterError> {
        self.client.clone().lease_revoke(lease).await.map_err(self.err())?;
        Ok(())
    }
}
