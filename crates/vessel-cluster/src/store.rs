//! The control store as the node daemon uses it: registration under a lease, the
//! leader election, writes guarded by leadership, and reads of the key layout.

use crate::keys::{self, NodeRecord};
use crate::ClusterError;
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, DeleteOptions, GetOptions, LeaderKey, PutOptions, Txn, TxnOp,
    WatchOptions,
};
use serde::{de::DeserializeOwned, Serialize};
use std::time::Duration;
use tokio::sync::watch;

/// One write of [`Store::write_as_leader`].
#[derive(Debug, Clone)]
pub enum Write {
    Put(String, Vec<u8>),
    Delete(String),
}

/// Writes guarded by one key's revision.
#[derive(Debug, Clone)]
pub struct Guarded {
    pub key: String,
    pub mod_revision: i64,
    pub writes: Vec<Write>,
}

/// One key as read by [`Store::list_raw`].
#[derive(Debug, Clone)]
pub struct RawKv {
    pub key: String,
    pub value: Vec<u8>,
    pub mod_revision: i64,
}

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

    /// Place a VE only if its placement is unchanged since `mod_revision` (0: it has
    /// none), and only while `l` leads. `Ok(false)`: the placement changed meanwhile.
    pub async fn put_as_leader_if<T: Serialize>(
        &self,
        l: &Leadership,
        key: &str,
        value: &T,
        mod_revision: i64,
    ) -> Result<bool, ClusterError> {
        let cmp = if mod_revision == 0 {
            Compare::version(key, CompareOp::Equal, 0)
        } else {
            Compare::mod_revision(key, CompareOp::Equal, mod_revision)
        };
        // Two conditions in one transaction: tell which failed with a nested one.
        let inner = Txn::new()
            .when(vec![cmp])
            .and_then(vec![TxnOp::put(key, keys::encode(value), None)]);
        let txn = Txn::new().when(vec![Self::leads(l)]).and_then(vec![TxnOp::txn(inner)]);
        let r = self.client.clone().txn(txn).await.map_err(self.err())?;
        if !r.succeeded() {
            return Err(ClusterError::NotLeader);
        }
        Ok(r.op_responses().iter().any(|o| match o {
            etcd_client::TxnOpResponse::Txn(t) => t.succeeded(),
            _ => false,
        }))
    }

    /// Many guarded writes in few round trips: each item's writes happen only if its key
    /// is unchanged since its `mod_revision` (0: absent), and all only while `l` leads.
    /// Returns how many items were written.
    pub async fn write_as_leader(&self, l: &Leadership, items: Vec<Guarded>) -> Result<usize, ClusterError> {
        let mut done = 0;
        let mut items = items.into_iter().peekable();
        while items.peek().is_some() {
            // etcd allows 128 operations per transaction (nested ones count).
            let mut ops = Vec::new();
            let mut count = 0;
            while let Some(it) = items.peek() {
                if count + 1 + it.writes.len() > 120 && !ops.is_empty() {
                    break;
                }
                let it = items.next().expect("peeked");
                count += 1 + it.writes.len();
                let cmp = if it.mod_revision == 0 {
                    Compare::version(it.key.as_str(), CompareOp::Equal, 0)
                } else {
                    Compare::mod_revision(it.key.as_str(), CompareOp::Equal, it.mod_revision)
                };
                let writes = it
                    .writes
                    .into_iter()
                    .map(|w| match w {
                        Write::Put(k, v) => TxnOp::put(k, v, None),
                        Write::Delete(k) => TxnOp::delete(k, None),
                    })
                    .collect::<Vec<_>>();
                ops.push(TxnOp::txn(Txn::new().when(vec![cmp]).and_then(writes)));
            }
            let txn = Txn::new().when(vec![Self::leads(l)]).and_then(ops);
            let r = self.client.clone().txn(txn).await.map_err(self.err())?;
            if !r.succeeded() {
                return Err(ClusterError::NotLeader);
            }
            done += r
                .op_responses()
                .iter()
                .filter(|o| matches!(o, etcd_client::TxnOpResponse::Txn(t) if t.succeeded()))
                .count();
        }
        Ok(done)
    }

    fn leads(l: &Leadership) -> Compare {
        Compare::create_revision(l.key.key(), CompareOp::Equal, l.key.rev())
    }

    async fn txn_as_leader(&self, l: &Leadership, ops: Vec<TxnOp>) -> Result<(), ClusterError> {
        let txn = Txn::new().when(vec![Self::leads(l)]).and_then(ops);
        let r = self.client.clone().txn(txn).await.map_err(self.err())?;
        if r.succeeded() {
            Ok(())
        } else {
            Err(ClusterError::NotLeader)
        }
    }

    /// Every key under `prefix` with its raw value and modification revision (for reading
    /// keys of several kinds in one consistent read).
    pub async fn list_raw(&self, prefix: &str) -> Result<Vec<RawKv>, ClusterError> {
        let r = self
            .client
            .clone()
            .get(prefix, Some(GetOptions::new().with_prefix()))
            .await
            .map_err(self.err())?;
        Ok(r.kvs()
            .iter()
            .map(|kv| RawKv {
                key: String::from_utf8_lossy(kv.key()).into_owned(),
                value: kv.value().to_vec(),
                mod_revision: kv.mod_revision(),
            })
            .collect())
    }

    /// A value with its modification revision (for [`Store::put_if`]).
    pub async fn get_rev<T: DeserializeOwned>(&self, key: &str) -> Result<Option<(T, i64)>, ClusterError> {
        let r = self.client.clone().get(key, None).await.map_err(self.err())?;
        r.kvs()
            .first()
            .map(|kv| keys::decode(key, kv.value()).map(|v| (v, kv.mod_revision())))
            .transpose()
    }

    /// Write `value` at `key` only if the key does not exist; false if it did.
    pub async fn create<T: Serialize>(&self, key: &str, value: &T) -> Result<bool, ClusterError> {
        self.txn_if(
            vec![Compare::version(key, CompareOp::Equal, 0)],
            vec![TxnOp::put(key, keys::encode(value), None)],
        )
        .await
    }

    /// Write `value` at `key` only if the key is unchanged since `mod_revision` (0: absent);
    /// false if someone wrote it meanwhile.
    pub async fn put_if<T: Serialize>(&self, key: &str, value: &T, mod_revision: i64) -> Result<bool, ClusterError> {
        let cmp = if mod_revision == 0 {
            Compare::version(key, CompareOp::Equal, 0)
        } else {
            Compare::mod_revision(key, CompareOp::Equal, mod_revision)
        };
        self.txn_if(vec![cmp], vec![TxnOp::put(key, keys::encode(value), None)])
            .await
    }

    async fn txn_if(&self, when: Vec<Compare>, ops: Vec<TxnOp>) -> Result<bool, ClusterError> {
        let r = self
            .client
            .clone()
            .txn(Txn::new().when(when).and_then(ops))
            .await
            .map_err(self.err())?;
        Ok(r.succeeded())
    }

    /// Delete every key under `prefix`.
    pub async fn delete_prefix(&self, prefix: &str) -> Result<(), ClusterError> {
        self.client
            .clone()
            .delete(prefix, Some(DeleteOptions::new().with_prefix()))
            .await
            .map_err(self.err())?;
        Ok(())
    }

    /// Wake `notify` at every change under `prefix` (and after the watch is re-made when
    /// etcd was away, since changes may have been missed), until the task is aborted.
    pub fn watch_prefix(
        &self,
        prefix: String,
        notify: std::sync::Arc<tokio::sync::Notify>,
    ) -> tokio::task::JoinHandle<()> {
        let client = self.client.clone();
        tokio::spawn(async move {
            loop {
                let w = client
                    .clone()
                    .watch(prefix.as_str(), Some(WatchOptions::new().with_prefix()))
                    .await;
                if let Ok((_watcher, mut stream)) = w {
                    notify.notify_one();
                    while let Ok(Some(_)) = stream.message().await {
                        notify.notify_one();
                    }
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
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
