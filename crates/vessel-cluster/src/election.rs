//! The control center's election, run by the client over the KV API with etcd's own
//! layout and rule (`concurrency.Election`: key `<election>/<lease hex>` under the
//! candidate's lease; the oldest key by creation revision leads).
//!
//! Not the `Campaign` RPC: it is one long call bound to one member, and when the client
//! gives it up (the member went silent) etcd's server resigns for it once the member runs
//! again (`Election.Campaign` on a cancelled context deletes the key, and the key is the
//! same for the same lease): a leader that had meanwhile won through another member would
//! lose its key. Here every step is a short request that may go to any member and run
//! twice: make the key if absent (else adopt it: same lease, same key, same place in the
//! queue), read the candidates, watch the one just before ours.

use crate::endpoints::{election_step, ElectionStep};
use crate::keys;
use crate::pool::Pool;
use crate::ClusterError;
use etcd_client::{
    Compare, CompareOp, EventType, GetOptions, PutOptions, SortOrder, SortTarget, Txn, TxnOp, WatchOptions,
};
use std::time::{Duration, Instant};

/// How often a waiting candidate reads the queue again even if its watch said nothing (a
/// watch on a stopped member is silent).
const RECHECK: Duration = Duration::from_secs(1);
/// A campaign that reaches no member for this long returns the error.
const GIVE_UP: Duration = Duration::from_secs(30);

/// The election's key prefix (etcd's election adds the `/`).
pub(crate) fn prefix() -> String {
    format!("{}/", keys::election())
}

/// Wait until the candidate `value` under `lease` leads; returns its key and the key's
/// creation revision. Errors: the lease is gone, or no member answered for [`GIVE_UP`].
pub(crate) async fn campaign(pool: &Pool, value: &str, lease: i64) -> Result<(String, i64), ClusterError> {
    let prefix = prefix();
    let key = format!("{prefix}{lease:x}");
    let mut failing_since: Option<Instant> = None;
    loop {
        match step(pool, &prefix, &key, value, lease).await {
            Ok(Some(rev)) => return Ok((key, rev)),
            Ok(None) => failing_since = None,
            Err(e @ ClusterError::Unreachable { .. }) => {
                let t0 = *failing_since.get_or_insert_with(Instant::now);
                if t0.elapsed() > GIVE_UP {
                    return Err(e);
                }
                tracing::debug!("campaign: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Make (or adopt) our key, then follow the queue until we lead (`Some(rev)`) or must
/// start over (`None`: our key went missing).
async fn step(pool: &Pool, prefix: &str, key: &str, value: &str, lease: i64) -> Result<Option<i64>, ClusterError> {
    let rev = make_or_adopt(pool, key, value, lease).await?;
    loop {
        let (candidates, at) = read_queue(pool, prefix).await?;
        match election_step(&candidates, key, rev) {
            ElectionStep::Lead => return Ok(Some(rev)),
            ElectionStep::Missing => return Ok(None),
            ElectionStep::WaitFor(before) => wait_deleted(pool, &before, at).await,
        }
    }
}

/// Put our key under the lease if it does not exist; its creation revision either way.
async fn make_or_adopt(pool: &Pool, key: &str, value: &str, lease: i64) -> Result<i64, ClusterError> {
    let txn = Txn::new()
        .when(vec![Compare::create_revision(key, CompareOp::Equal, 0)])
        .and_then(vec![TxnOp::put(key, value, Some(PutOptions::new().with_lease(lease)))])
        .or_else(vec![TxnOp::get(key, None)]);
    let r = pool
        .call(|mut c| {
            let txn = txn.clone();
            async move { c.txn(txn).await }
        })
        .await?;
    if r.succeeded() {
        return r.header().map(|h| h.revision()).ok_or_else(|| no_header(key));
    }
    r.op_responses()
        .iter()
        .find_map(|o| match o {
            etcd_client::TxnOpResponse::Get(g) => g.kvs().first().map(|kv| kv.create_revision()),
            _ => None,
        })
        // Deleted between the compare and the get of one transaction cannot be: etcd
        // applies it at one revision. Absent here means a malformed answer.
        .ok_or_else(|| no_header(key))
}

fn no_header(key: &str) -> ClusterError {
    ClusterError::Value {
        key: key.to_string(),
        reason: "etcd answered the election's transaction without a revision".into(),
    }
}

/// Every candidate's key and creation revision, and the revision of the read.
async fn read_queue(pool: &Pool, prefix: &str) -> Result<(Vec<(String, i64)>, i64), ClusterError> {
    let opts = GetOptions::new()
        .with_prefix()
        .with_keys_only()
        .with_sort(SortTarget::Create, SortOrder::Ascend);
    let r = pool
        .call(|mut c| {
            let opts = opts.clone();
            async move { c.get(prefix, Some(opts)).await }
        })
        .await?;
    let at = r.header().map_or(0, |h| h.revision());
    let keys = r
        .kvs()
        .iter()
        .map(|kv| (String::from_utf8_lossy(kv.key()).into_owned(), kv.create_revision()))
        .collect();
    Ok((keys, at))
}

/// Return when `key` is deleted after revision `at`, when the watch breaks, or after
/// [`RECHECK`] at the latest.
async fn wait_deleted(pool: &Pool, key: &str, at: i64) {
    let t0 = Instant::now();
    let i = pool.current();
    let opts = WatchOptions::new().with_start_revision(at + 1);
    let waited = tokio::time::timeout(RECHECK, async {
        let Some((_watcher, mut stream)) = pool.open_watch(i, key, opts).await else {
            return false;
        };
        loop {
            match stream.message().await {
                Ok(Some(r)) if r.canceled() => return false,
                Ok(Some(r)) => {
                    if r.events().iter().any(|e| e.event_type() == EventType::Delete) {
                        return true;
                    }
                }
                _ => return false,
            }
        }
    })
    .await;
    if waited == Ok(false) && t0.elapsed() < Duration::from_millis(100) {
        // The member refused at once: do not spin.
        pool.failed(i);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The current leader's value: the oldest candidate's.
pub(crate) async fn leader(pool: &Pool) -> Result<Option<String>, ClusterError> {
    let prefix = prefix();
    let opts = GetOptions::new()
        .with_prefix()
        .with_sort(SortTarget::Create, SortOrder::Ascend)
        .with_limit(1);
    let r = pool
        .call(|mut c| {
            let (prefix, opts) = (prefix.clone(), opts.clone());
            async move { c.get(prefix, Some(opts)).await }
        })
        .await?;
    Ok(r.kvs()
        .first()
        .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()))
}
