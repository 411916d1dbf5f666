//! The control store as the node daemon uses it: registration under a lease, the
//! leader election, writes guarded by leadership, and reads of the key layout.
//!
//! Every request goes to one member of the etcd cluster and moves to the next one when
//! that member does not answer ([`crate::pool`]); the lease keep-alive ([`crate::lease`]),
//! the election ([`crate::election`]) and watches move the same way. So one member down,
//! stopped or cut off costs at most one short try, and the node keeps its lease.

use crate::endpoints::{KeepAlivePlan, Timeouts};
use crate::keys::{self, NodeRecord};
use crate::pool::Pool;
use crate::ClusterError;
use etcd_client::{Compare, CompareOp, DeleteOptions, GetOptions, PutOptions, Txn, TxnOp, WatchOptions};
use serde::{de::DeserializeOwned, Serialize};
use std::sync::Arc;
use std::time::{Duration, Instant};
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
    /// The lease the key is attached to (0: none).
    pub lease: i64,
}

/// A connection to the control store (to each of its members).
#[derive(Clone)]
pub struct Store {
    pool: Arc<Pool>,
}

/// A node's registration: its lease is kept alive until this is dropped (or etcd says the
/// lease is gone, or no member renewed it for two TTLs: `alive` turns false, and the node
/// must stop acting for the cluster).
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
    /// The election key (`<election>/<lease hex>`) and its creation revision.
    key: String,
    rev: i64,
}

impl Leadership {
    /// The election revision: grows with every new leader.
    pub fn revision(&self) -> i64 {
        self.rev
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
    /// Connections to the members at `endpoints` (nothing is dialed yet: the first request
    /// tells whether etcd answers).
    pub async fn connect(endpoints: &[String]) -> Result<Store, ClusterError> {
        Self::connect_with(endpoints, None).await
    }

    /// Connect; `tls` is used for `https://` endpoints (the server verified against its CA,
    /// this node's certificate presented).
    pub async fn connect_with(endpoints: &[String], tls: Option<&StoreTls>) -> Result<Store, ClusterError> {
        Self::connect_tuned(endpoints, Timeouts::default(), tls).await
    }

    pub async fn connect_tuned(
        endpoints: &[String],
        timeouts: Timeouts,
        tls: Option<&StoreTls>,
    ) -> Result<Store, ClusterError> {
        Ok(Store {
            pool: Arc::new(Pool::connect(endpoints, timeouts, tls).await?),
        })
    }

    /// The member requests go to now (the last one that answered).
    pub fn endpoint(&self) -> String {
        self.pool.url(self.pool.current()).to_string()
    }

    /// Put the node's record under a new lease of `ttl` and keep the lease alive (three
    /// keep-alives per TTL, through whichever member answers).
    pub async fn register(&self, rec: &NodeRecord, ttl: Duration) -> Result<Registration, ClusterError> {
        let secs = ttl.as_secs().max(1) as i64;
        let granted = Instant::now();
        // A grant retried on another member may leave the first lease behind: it expires.
        let lease = self
            .pool
            .call(|mut c| async move { c.lease_grant(secs, None).await })
            .await?
            .id();
        let (key, value) = (keys::node(&rec.name), keys::encode(rec));
        self.pool
            .call(|mut c| {
                let (key, value) = (key.clone(), value.clone());
                async move { c.put(key, value, Some(PutOptions::new().with_lease(lease))).await }
            })
            .await?;
        let ttl = Duration::from_secs(secs as u64);
        let (tx, rx) = watch::channel(true);
        let task = tokio::spawn(crate::lease::keep_alive(
            self.pool.clone(),
            lease,
            KeepAlivePlan::for_ttl(ttl),
            granted,
            tx,
        ));
        Ok(Registration {
            lease,
            ttl,
            alive: rx,
            task,
        })
    }

    /// Every registered node (those whose lease is alive).
    pub async fn nodes(&self) -> Result<Vec<NodeRecord>, ClusterError> {
        self.list(&keys::nodes()).await
    }

    /// The keys under `prefix` (or the one key).
    async fn range(&self, key: &str, prefix: bool) -> Result<etcd_client::GetResponse, ClusterError> {
        let opts = prefix.then(|| GetOptions::new().with_prefix());
        self.pool
            .call(|mut c| {
                let opts = opts.clone();
                async move { c.get(key, opts).await }
            })
            .await
    }

    /// The values under `prefix`, decoded (read in pages: see [`Store::list_raw`]).
    pub async fn list<T: DeserializeOwned>(&self, prefix: &str) -> Result<Vec<T>, ClusterError> {
        self.list_raw(prefix)
            .await?
            .iter()
            .map(|kv| keys::decode(&kv.key, &kv.value))
            .collect()
    }

    pub async fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, ClusterError> {
        let r = self.range(key, false).await?;
        r.kvs().first().map(|kv| keys::decode(key, kv.value())).transpose()
    }

    /// Wait until this node is the control center's leader (`lease`: its registration's,
    /// so leadership ends when the node's lease does). The wait survives members that
    /// stop answering; it fails when the lease is gone or no member answered for 30 s.
    pub async fn campaign(&self, node: &str, lease: i64) -> Result<Leadership, ClusterError> {
        let (key, rev) = crate::election::campaign(&self.pool, node, lease).await?;
        Ok(Leadership { key, rev })
    }

    /// The current leader's name, if any.
    pub async fn leader(&self) -> Result<Option<String>, ClusterError> {
        crate::election::leader(&self.pool).await
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
        let r = self.txn(txn).await?;
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
            let r = self.txn(txn).await?;
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
        Compare::create_revision(l.key.as_str(), CompareOp::Equal, l.rev)
    }

    /// One transaction. Retried on another member when one does not answer: every
    /// transaction here is guarded, so a second run of one that did land changes nothing
    /// (it reports its guard as failed).
    async fn txn(&self, txn: Txn) -> Result<etcd_client::TxnResponse, ClusterError> {
        self.pool
            .call(|mut c| {
                let txn = txn.clone();
                async move { c.txn(txn).await }
            })
            .await
    }

    async fn txn_as_leader(&self, l: &Leadership, ops: Vec<TxnOp>) -> Result<(), ClusterError> {
        let r = self.txn(Txn::new().when(vec![Self::leads(l)]).and_then(ops)).await?;
        if r.succeeded() {
            Ok(())
        } else {
            Err(ClusterError::NotLeader)
        }
    }

    /// Every key under `prefix` with its raw value and modification revision (for reading
    /// keys of several kinds in one consistent read). Read in pages of [`PAGE`] keys, all
    /// at the revision of the first page (so still one consistent read): one answer for a
    /// whole large prefix would pass the client's 4 MiB message limit (the scheduler's read
    /// of every VE did, at about 6,000 VEs).
    pub async fn list_raw(&self, prefix: &str) -> Result<Vec<RawKv>, ClusterError> {
        let end = prefix_end(prefix.as_bytes());
        let mut out = Vec::new();
        let mut from = prefix.as_bytes().to_vec();
        let mut rev = 0;
        loop {
            let mut opts = GetOptions::new().with_range(end.clone()).with_limit(PAGE);
            if rev > 0 {
                opts = opts.with_revision(rev);
            }
            let r = self
                .pool
                .call(|mut c| {
                    let (from, opts) = (from.clone(), opts.clone());
                    async move { c.get(from, Some(opts)).await }
                })
                .await?;
            if rev == 0 {
                rev = r.header().map_or(0, |h| h.revision());
            }
            out.extend(r.kvs().iter().map(|kv| RawKv {
                key: String::from_utf8_lossy(kv.key()).into_owned(),
                value: kv.value().to_vec(),
                mod_revision: kv.mod_revision(),
                lease: kv.lease(),
            }));
            match r.kvs().last() {
                Some(last) if r.more() => {
                    from = last.key().to_vec();
                    from.push(0);
                }
                _ => return Ok(out),
            }
        }
    }

    /// A value with its modification revision (for [`Store::put_if`]).
    pub async fn get_rev<T: DeserializeOwned>(&self, key: &str) -> Result<Option<(T, i64)>, ClusterError> {
        let r = self.range(key, false).await?;
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

    /// `writes` in one transaction, only if every key of `expect` is unchanged since its
    /// modification revision (0: absent); false if one is not. Claims of addresses and uid
    /// slots are made with this (create-if-absent on several keys at once).
    pub async fn write_if(&self, expect: &[(String, i64)], writes: Vec<Write>) -> Result<bool, ClusterError> {
        let when = expect
            .iter()
            .map(|(k, rev)| {
                if *rev == 0 {
                    Compare::version(k.as_str(), CompareOp::Equal, 0)
                } else {
                    Compare::mod_revision(k.as_str(), CompareOp::Equal, *rev)
                }
            })
            .collect();
        let ops = writes
            .into_iter()
            .map(|w| match w {
                Write::Put(k, v) => TxnOp::put(k, v, None),
                Write::Delete(k) => TxnOp::delete(k, None),
            })
            .collect();
        self.txn_if(when, ops).await
    }

    async fn txn_if(&self, when: Vec<Compare>, ops: Vec<TxnOp>) -> Result<bool, ClusterError> {
        Ok(self.txn(Txn::new().when(when).and_then(ops)).await?.succeeded())
    }

    /// Delete every key under `prefix`.
    pub async fn delete_prefix(&self, prefix: &str) -> Result<(), ClusterError> {
        self.pool
            .call(|mut c| async move { c.delete(prefix, Some(DeleteOptions::new().with_prefix())).await })
            .await?;
        Ok(())
    }

    /// Wake `notify` at every change under `prefix` (and after the watch is re-made on
    /// another member, since changes may have been missed), until the task is aborted. A
    /// watch whose member goes silent (stopped, cut off: it answers no progress request for
    /// two probes) or loses its raft leader is made again on the next member.
    pub fn watch_prefix(
        &self,
        prefix: String,
        notify: std::sync::Arc<tokio::sync::Notify>,
    ) -> tokio::task::JoinHandle<()> {
        let pool = self.pool.clone();
        tokio::spawn(async move {
            loop {
                let i = pool.current();
                if watch_on(&pool, i, &prefix, &notify).await {
                    // It had worked: this member is done with, try the next at once.
                    pool.failed(i);
                } else {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        })
    }

    /// Write a value any node may write (its own status, a VE spec from the CLI).
    pub async fn put<T: Serialize>(&self, key: &str, value: &T) -> Result<(), ClusterError> {
        let value = keys::encode(value);
        self.pool
            .call(|mut c| {
                let value = value.clone();
                async move { c.put(key, value, None).await }
            })
            .await?;
        Ok(())
    }

    /// Delete a key any node may delete (a removed member's record).
    pub async fn delete(&self, key: &str) -> Result<(), ClusterError> {
        self.pool.call(|mut c| async move { c.delete(key, None).await }).await?;
        Ok(())
    }

    /// End a lease now (a node leaving: its record and leadership go at once).
    /// A lease's granted TTL and the seconds it has left (None: expired or unknown).
    pub async fn lease_ttl(&self, lease: i64) -> Result<Option<(i64, i64)>, ClusterError> {
        let r = self
            .pool
            .call(|mut c| async move { c.lease_time_to_live(lease, None).await })
            .await?;
        Ok((r.ttl() >= 0).then(|| (r.granted_ttl(), r.ttl())))
    }

    pub async fn revoke(&self, lease: i64) -> Result<(), ClusterError> {
        let mut tries = 0;
        let r = self
            .pool
            .call(|mut c| {
                tries += 1;
                async move { c.lease_revoke(lease).await }
            })
            .await;
        match r {
            Ok(_) => Ok(()),
            // A first try landed without its answer: the retry finds the lease gone.
            Err(ClusterError::Etcd {
                source: etcd_client::Error::GRpcStatus(s),
                ..
            }) if tries > 1 && s.code() == tonic::Code::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// Keys per page of [`Store::list_raw`]: a VE's status is about 0.5 KiB, so a page stays
/// far below the client's 4 MiB message limit.
const PAGE: i64 = 1000;

/// The first key after every key that starts with `prefix` (etcd's range end of a prefix).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // Every byte 0xff (or empty): to the end of the key space.
    vec![0]
}

/// How often a silent watch asks its member for progress.
const PROBE: Duration = Duration::from_secs(1);

/// Watch `prefix` on member `i` until the watch breaks. True if it was established.
async fn watch_on(pool: &Pool, i: usize, prefix: &str, notify: &tokio::sync::Notify) -> bool {
    let Some((mut watcher, mut stream)) = pool.open_watch(i, prefix, WatchOptions::new().with_prefix()).await else {
        return false;
    };
    // Changes may have happened while no watch was in place.
    notify.notify_one();
    let mut heard = Instant::now();
    loop {
        tokio::select! {
            m = stream.message() => match m {
                Ok(Some(r)) if !r.canceled() => {
                    heard = Instant::now();
                    if !r.events().is_empty() {
                        notify.notify_one();
                    }
                }
                Ok(Some(r)) => {
                    tracing::debug!(member = pool.url(i), reason = r.cancel_reason(), "watch cancelled");
                    return true;
                }
                Ok(None) => return true,
                Err(e) => {
                    tracing::debug!(member = pool.url(i), "watch: {e}");
                    return true;
                }
            },
            _ = tokio::time::sleep(PROBE) => {
                if heard.elapsed() > PROBE * 2 {
                    tracing::debug!(member = pool.url(i), "watch: no answer to progress requests");
                    return true;
                }
                if watcher.request_progress().await.is_err() {
                    return true;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::prefix_end;

    #[test]
    fn a_prefix_ends_at_its_last_byte_plus_one() {
        assert_eq!(prefix_end(b"/vessel/v1/ves/"), b"/vessel/v1/ves0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
        assert_eq!(prefix_end(b""), vec![0]);
    }
}
