//! Which etcd member a request goes to, what a failure means, and how long to wait: the
//! pure decisions behind [`crate::pool`], the lease keep-alive and the election.
//!
//! Why not etcd-client's own balancing: `Client::connect` with several URLs puts them in
//! one tonic `balance_channel`, whose endpoints are lazy `Reconnect` services. A lazy
//! `Reconnect` whose connect failed still reports `poll_ready` = ready and hands the error
//! to the next `call` (tonic 0.14 `transport/channel/service/reconnect.rs`), so the p2c
//! balancer never evicts a dead member and keeps picking it, the more as it is the least
//! loaded (it fails at once): most requests failed with one of three members down. A
//! stopped or cut-off member is worse: its requests hang until the client timeout. So the
//! store keeps one connection per member and decides here where each request goes.

use std::time::Duration;

/// What to do after a request failed on one member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The member did not answer or cannot serve now (refused, reset, unavailable, no
    /// leader, overloaded, timed out): try the same request on the next member.
    NextMember,
    /// The cluster answered and the request itself failed (a lease that is gone, a bad
    /// argument, a compacted revision): another member would say the same.
    Answer,
}

/// How a failed try is classified.
pub fn classify(e: &etcd_client::Error) -> Verdict {
    use etcd_client::Error as E;
    match e {
        E::GRpcStatus(s) => classify_code(s.code()),
        E::TransportError(_) | E::IoError(_) | E::WatchError(_) => Verdict::NextMember,
        // etcd-client's own words when a keep-alive is answered with TTL 0.
        E::LeaseKeepAliveError(m) if m.contains("not found") => Verdict::Answer,
        E::LeaseKeepAliveError(_) => Verdict::NextMember,
        _ => Verdict::Answer,
    }
}

/// gRPC codes as etcd 3.4 and tonic 0.14 use them: etcd answers `Unavailable` for "no
/// leader", "leader changed", "request timed out" and "server stopped", tonic for a
/// refused connect; tonic's own timeout is `Cancelled`; a reset connection is `Unknown`
/// or `Internal`; "too many requests" is `ResourceExhausted`.
pub fn classify_code(c: tonic::Code) -> Verdict {
    use tonic::Code as C;
    match c {
        C::Unavailable | C::DeadlineExceeded | C::Cancelled | C::Unknown | C::Internal | C::ResourceExhausted => {
            Verdict::NextMember
        }
        _ => Verdict::Answer,
    }
}

/// The members one round tries, in order: the one that answered last, then the next
/// ones, each once.
pub fn attempt_order(current: usize, n: usize) -> impl Iterator<Item = usize> {
    (0..n).map(move |k| (current + k) % n.max(1))
}

/// The member to use after `failed` did not answer, when `current` is the one in use.
/// Another call may already have moved on: then that choice stands.
pub fn after_failure(current: usize, failed: usize, n: usize) -> usize {
    if current == failed {
        (failed + 1) % n.max(1)
    } else {
        current
    }
}

/// How long a unary request waits, per try and in all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// A try in the first pass over the members. A stopped or cut-off member costs this
    /// much once (then the store uses another one): it must be well under the node lease's
    /// TTL (2 s) and well over a healthy member's answer (milliseconds).
    pub try_: Duration,
    /// A call ends with an error once this much has passed (what one request waited before
    /// the store tried several members). Within it, a call makes more passes over the
    /// members: a cluster electing its raft leader (about one election timeout, 1 s)
    /// answers "leader changed" or "no leader" from every member until it has one.
    pub budget: Duration,
    /// The pause between passes.
    pub pause: Duration,
}

impl Default for Timeouts {
    fn default() -> Timeouts {
        Timeouts {
            try_: Duration::from_secs(1),
            budget: Duration::from_secs(5),
            pause: Duration::from_millis(200),
        }
    }
}

impl Timeouts {
    /// The timeout of the `k`-th try (from 0) of a call over `n` members, `spent` into the
    /// call; `None` when the budget is spent. Each pass doubles the per-try timeout (a
    /// healthy but slow cluster still answers), never past what is left of the budget.
    pub fn for_try(&self, k: usize, n: usize, spent: Duration) -> Option<Duration> {
        let left = self.budget.checked_sub(spent).filter(|d| !d.is_zero())?;
        let pass = (k / n.max(1)).min(8) as u32;
        Some(self.try_.saturating_mul(1 << pass).min(left))
    }

    /// Whether try `k` starts a new pass (and so waits [`Timeouts::pause`] first).
    pub fn new_pass(k: usize, n: usize) -> bool {
        k > 0 && k.is_multiple_of(n.max(1))
    }
}

/// The keep-alive's timing for a lease of `ttl`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeepAlivePlan {
    /// Renew this often: three times per TTL.
    pub every: Duration,
    /// Wait this long for one member's answer before asking the next: a quarter TTL, so
    /// that after a renewal, the next tick (1/3 TTL) plus a silent member (1/4) plus a
    /// healthy one still lands before the TTL runs out.
    pub try_timeout: Duration,
    /// Without a renewal for this long, the lease is taken as lost (it may still live if
    /// the etcd cluster was electing a raft leader, which extends every lease).
    pub give_up: Duration,
    /// The pause before the next round when no member answered.
    pub retry: Duration,
}

impl KeepAlivePlan {
    pub fn for_ttl(ttl: Duration) -> KeepAlivePlan {
        let every = (ttl / 3).max(Duration::from_millis(100));
        let try_timeout = (ttl / 4).clamp(Duration::from_millis(100), Duration::from_secs(1));
        KeepAlivePlan {
            every,
            try_timeout,
            give_up: ttl * 2,
            retry: Duration::from_millis(100).min(every),
        }
    }
}

/// The result of one keep-alive round over the members.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Round {
    /// A member renewed the lease.
    Renewed,
    /// The cluster says the lease does not exist (expired or revoked).
    Gone,
    /// No member answered.
    NoAnswer,
}

/// What the keep-alive does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Wait, then renew again.
    After(Duration),
    /// The lease is lost: tell the node.
    Lost,
}

/// After a round, with `since_renewal` since the last renewal (before this round).
pub fn after_round(round: Round, since_renewal: Duration, plan: &KeepAlivePlan) -> Next {
    match round {
        Round::Renewed => Next::After(plan.every),
        Round::Gone => Next::Lost,
        Round::NoAnswer if since_renewal >= plan.give_up => Next::Lost,
        Round::NoAnswer => Next::After(plan.retry),
    }
}

/// A campaign's step, from the election's keys (key, creation revision) and our key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ElectionStep {
    /// Our key is the oldest: we lead.
    Lead,
    /// Wait until this key (the next older one) is deleted, then look again.
    WaitFor(String),
    /// Our key is not there (or was made again): make it again.
    Missing,
}

/// etcd's election rule (`concurrency.Election`): candidates queue by their key's creation
/// revision; the oldest leads; each waits for the one just before it.
pub fn election_step(keys: &[(String, i64)], mine: &str, my_rev: i64) -> ElectionStep {
    if !keys.iter().any(|(k, r)| k == mine && *r == my_rev) {
        return ElectionStep::Missing;
    }
    match keys.iter().filter(|(_, r)| *r < my_rev).max_by_key(|(_, r)| *r) {
        None => ElectionStep::Lead,
        Some((k, _)) => ElectionStep::WaitFor(k.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(c: tonic::Code, msg: &str) -> etcd_client::Error {
        etcd_client::Error::GRpcStatus(tonic::Status::new(c, msg))
    }

    #[test]
    fn transport_failures_go_to_the_next_member_answers_do_not() {
        use Verdict::*;
        for (c, msg, want) in [
            (
                tonic::Code::Unavailable,
                "tcp connect error: Connection refused (os error 111)",
                NextMember,
            ),
            (tonic::Code::Unavailable, "etcdserver: no leader", NextMember),
            (tonic::Code::Unavailable, "etcdserver: leader changed", NextMember),
            (tonic::Code::Unavailable, "etcdserver: request timed out", NextMember),
            (tonic::Code::Cancelled, "Timeout expired", NextMember),
            (tonic::Code::DeadlineExceeded, "context deadline exceeded", NextMember),
            (tonic::Code::Unknown, "transport error", NextMember),
            (tonic::Code::Internal, "h2 protocol error", NextMember),
            (
                tonic::Code::ResourceExhausted,
                "etcdserver: too many requests",
                NextMember,
            ),
            (tonic::Code::NotFound, "etcdserver: requested lease not found", Answer),
            (tonic::Code::InvalidArgument, "etcdserver: request is too large", Answer),
            (
                tonic::Code::OutOfRange,
                "mvcc: required revision has been compacted",
                Answer,
            ),
            (tonic::Code::FailedPrecondition, "etcdserver: not capable", Answer),
            (tonic::Code::PermissionDenied, "etcdserver: permission denied", Answer),
        ] {
            assert_eq!(classify(&status(c, msg)), want, "{c:?} {msg}");
        }
        assert_eq!(
            classify(&etcd_client::Error::IoError(std::io::Error::from(
                std::io::ErrorKind::ConnectionReset
            ))),
            NextMember
        );
        assert_eq!(
            classify(&etcd_client::Error::WatchError("failed to create watch".into())),
            NextMember
        );
        assert_eq!(
            classify(&etcd_client::Error::LeaseKeepAliveError("lease not found".into())),
            Answer
        );
        assert_eq!(
            classify(&etcd_client::Error::LeaseKeepAliveError("channel closed".into())),
            NextMember
        );
        assert_eq!(classify(&etcd_client::Error::InvalidArgs("empty key".into())), Answer);
    }

    #[test]
    fn a_call_tries_each_member_once_from_the_one_in_use() {
        assert_eq!(attempt_order(0, 3).collect::<Vec<_>>(), vec![0, 1, 2]);
        assert_eq!(attempt_order(2, 3).collect::<Vec<_>>(), vec![2, 0, 1]);
        assert_eq!(attempt_order(0, 1).collect::<Vec<_>>(), vec![0]);
        assert_eq!(attempt_order(0, 0).count(), 0);
    }

    #[test]
    fn a_failure_moves_on_only_from_the_member_in_use() {
        assert_eq!(after_failure(1, 1, 3), 2);
        assert_eq!(after_failure(2, 2, 3), 0);
        // Another call already moved to 2 when 1's failure is reported: 2 stays.
        assert_eq!(after_failure(2, 1, 3), 2);
        assert_eq!(after_failure(0, 0, 1), 0);
    }

    #[test]
    fn later_passes_wait_longer_within_the_budget() {
        let t = Timeouts::default();
        let s = Duration::from_millis;
        let z = Duration::ZERO;
        // First pass: one short try per member.
        assert_eq!(
            (0..3).map(|k| t.for_try(k, 3, z)).collect::<Vec<_>>(),
            vec![Some(t.try_); 3]
        );
        // Second pass: twice as long, but never past the budget.
        assert_eq!(t.for_try(3, 3, s(1200)), Some(s(2000)));
        assert_eq!(t.for_try(4, 3, s(4000)), Some(s(1000)));
        assert_eq!(t.for_try(5, 3, s(5000)), None);
        assert_eq!(t.for_try(0, 3, s(6000)), None);
        // One member: every try is a pass.
        assert_eq!(t.for_try(1, 1, s(1000)), Some(s(2000)));
        // Many quick passes (everyone says "no leader") stay bounded.
        assert_eq!(t.for_try(90, 3, s(100)), Some(s(4900)));
        assert!(!Timeouts::new_pass(0, 3) && !Timeouts::new_pass(2, 3));
        assert!(Timeouts::new_pass(3, 3) && Timeouts::new_pass(6, 3) && Timeouts::new_pass(1, 1));
    }

    #[test]
    fn the_keep_alive_fits_a_silent_member_and_a_healthy_one_into_the_ttl() {
        let ttl = Duration::from_secs(2);
        let p = KeepAlivePlan::for_ttl(ttl);
        assert_eq!(p.every, ttl / 3);
        assert_eq!(p.try_timeout, Duration::from_millis(500));
        // Renewed at 0; next tick; one silent member; one more try: before the TTL.
        assert!(p.every + p.try_timeout * 2 < ttl);
        assert_eq!(p.give_up, Duration::from_secs(4));
        // Short and long TTLs stay within bounds.
        let p1 = KeepAlivePlan::for_ttl(Duration::from_secs(1));
        assert_eq!(p1.try_timeout, Duration::from_millis(250));
        let p60 = KeepAlivePlan::for_ttl(Duration::from_secs(60));
        assert_eq!(p60.try_timeout, Duration::from_secs(1));
        assert_eq!(p60.every, Duration::from_secs(20));
        assert_eq!(KeepAlivePlan::for_ttl(Duration::ZERO).every, Duration::from_millis(100));
    }

    #[test]
    fn the_lease_is_lost_when_etcd_says_so_or_nothing_renewed_it_for_two_ttls() {
        let p = KeepAlivePlan::for_ttl(Duration::from_secs(2));
        let s = Duration::from_secs;
        assert_eq!(after_round(Round::Renewed, s(3), &p), Next::After(p.every));
        assert_eq!(after_round(Round::Gone, s(0), &p), Next::Lost);
        assert_eq!(after_round(Round::NoAnswer, s(1), &p), Next::After(p.retry));
        assert_eq!(after_round(Round::NoAnswer, s(3), &p), Next::After(p.retry));
        assert_eq!(after_round(Round::NoAnswer, s(4), &p), Next::Lost);
    }

    #[test]
    fn candidates_queue_by_creation_revision() {
        let keys = |v: &[(&str, i64)]| v.iter().map(|(k, r)| (k.to_string(), *r)).collect::<Vec<_>>();
        let k = keys(&[("e/a", 10), ("e/b", 12), ("e/c", 15)]);
        assert_eq!(election_step(&k, "e/a", 10), ElectionStep::Lead);
        assert_eq!(election_step(&k, "e/b", 12), ElectionStep::WaitFor("e/a".into()));
        assert_eq!(election_step(&k, "e/c", 15), ElectionStep::WaitFor("e/b".into()));
        // Our key is gone, or is another incarnation (made again at another revision).
        assert_eq!(election_step(&k, "e/d", 20), ElectionStep::Missing);
        assert_eq!(election_step(&k, "e/b", 11), ElectionStep::Missing);
        // The order of the read does not matter.
        let shuffled = keys(&[("e/c", 15), ("e/a", 10), ("e/b", 12)]);
        assert_eq!(election_step(&shuffled, "e/c", 15), ElectionStep::WaitFor("e/b".into()));
    }
}
