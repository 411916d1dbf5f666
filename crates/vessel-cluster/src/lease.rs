//! Keeping a lease alive across members. etcd leases are cluster-wide: any member renews
//! any lease (a follower forwards to the raft leader). The keep-alive stream is bound to
//! one member's connection; when that member stops answering, the same lease is renewed
//! through the next member, within the TTL (timing in [`KeepAlivePlan`]).

use crate::endpoints::{after_round, attempt_order, classify, KeepAlivePlan, Next, Round, Verdict};
use crate::pool::Pool;
use etcd_client::{LeaseKeepAliveStream, LeaseKeeper};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::watch;

/// An open keep-alive stream on member `member`.
struct Stream {
    member: usize,
    keeper: LeaseKeeper,
    answers: LeaseKeepAliveStream,
}

/// Renew `lease` (granted at `granted`) until etcd says it is gone or nothing renewed it
/// for the plan's `give_up`; then send `false` on `alive` and return.
pub(crate) async fn keep_alive(
    pool: Arc<Pool>,
    lease: i64,
    plan: KeepAlivePlan,
    granted: Instant,
    alive: watch::Sender<bool>,
) {
    let mut stream: Option<Stream> = None;
    let mut renewed = granted;
    tokio::time::sleep(plan.every.saturating_sub(granted.elapsed())).await;
    loop {
        let since = renewed.elapsed();
        let round = renew(&pool, lease, &plan, &mut stream).await;
        if round == Round::Renewed {
            renewed = Instant::now();
        }
        match after_round(round, since, &plan) {
            Next::After(d) => tokio::time::sleep(d).await,
            Next::Lost => {
                tracing::warn!(lease, ?round, "the node's lease is lost");
                let _ = alive.send(false);
                return;
            }
        }
    }
}

/// One round: the stream's member (or the pool's), then the next ones, each once.
async fn renew(pool: &Pool, lease: i64, plan: &KeepAlivePlan, stream: &mut Option<Stream>) -> Round {
    let start = stream.as_ref().map_or_else(|| pool.current(), |s| s.member);
    for i in attempt_order(start, pool.len()) {
        match tokio::time::timeout(plan.try_timeout, renew_on(pool, i, lease, stream)).await {
            Ok(Ok(ttl)) if ttl > 0 => return Round::Renewed,
            Ok(Ok(_)) => return Round::Gone,
            Ok(Err(e)) if classify(&e) == Verdict::Answer => {
                tracing::warn!(lease, member = pool.url(i), "keep-alive: {e}");
                return Round::Gone;
            }
            Ok(Err(e)) => tracing::debug!(lease, member = pool.url(i), "keep-alive: {e}"),
            Err(_) => tracing::debug!(lease, member = pool.url(i), "keep-alive: no answer in time"),
        }
        // This member's stream is done with; the next try opens one on the next member.
        *stream = None;
        pool.failed(i);
    }
    Round::NoAnswer
}

/// Renew once through member `i`: on its open stream, or on a new one (whose opening
/// renews). Returns the TTL etcd answered (0: the lease is gone).
async fn renew_on(pool: &Pool, i: usize, lease: i64, stream: &mut Option<Stream>) -> Result<i64, etcd_client::Error> {
    if let Some(s) = stream.as_mut().filter(|s| s.member == i) {
        s.keeper.keep_alive().await?;
        return match s.answers.message().await? {
            Some(r) => Ok(r.ttl()),
            None => Err(etcd_client::Error::LeaseKeepAliveError(
                "the keep-alive stream ended".into(),
            )),
        };
    }
    *stream = None;
    // etcd-client sends the first renewal and waits for its answer; TTL 0 is an error
    // saying "lease not found".
    let (keeper, answers) = pool.stream(i).lease_keep_alive(lease).await?;
    *stream = Some(Stream {
        member: i,
        keeper,
        answers,
    });
    Ok(1)
}
