//! One connection per etcd member, the member in use, and unary calls that move to the
//! next member when one does not answer (decisions in [`crate::endpoints`]).

use crate::endpoints::{after_failure, classify, Timeouts, Verdict};
use crate::ClusterError;
use etcd_client::{Client, ConnectOptions};
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// One member's connections: `unary` for requests that the store retries elsewhere,
/// `stream` for watches and keep-alives, which ask the member to have a raft leader
/// (`hasleader`): a member cut off from the majority then ends them instead of keeping
/// them silently stale.
struct Member {
    url: String,
    unary: Client,
    stream: Client,
}

pub(crate) struct Pool {
    members: Vec<Member>,
    current: AtomicUsize,
    pub timeouts: Timeouts,
}

/// Why one try failed.
enum TryError {
    Etcd(etcd_client::Error),
    Timeout(Duration),
}

impl std::fmt::Display for TryError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TryError::Etcd(e) => write!(f, "{e}"),
            TryError::Timeout(t) => write!(f, "no answer within {} ms", t.as_millis()),
        }
    }
}

impl Pool {
    /// Connections to every member (made lazily: nothing is dialed here). The member used
    /// first is picked at random, so that many nodes spread over the members.
    pub async fn connect(
        urls: &[String],
        timeouts: Timeouts,
        tls: Option<&crate::store::StoreTls>,
    ) -> Result<Pool, ClusterError> {
        let mut members = Vec::new();
        for url in urls {
            let mut opts = ConnectOptions::new().with_connect_timeout(timeouts.try_);
            // (etcd-client refuses TLS options for http:// endpoints.)
            if let Some(t) = tls.filter(|_| url.starts_with("https://")) {
                opts = opts.with_tls(
                    etcd_client::TlsOptions::new()
                        .ca_certificate(etcd_client::Certificate::from_pem(&t.ca_pem))
                        .identity(etcd_client::Identity::from_pem(&t.cert_pem, &t.key_pem)),
                );
            }
            let err = |source| ClusterError::Etcd {
                endpoints: url.clone(),
                source,
            };
            let unary = Client::connect([url.as_str()], Some(opts.clone())).await.map_err(err)?;
            let stream = Client::connect([url.as_str()], Some(opts.with_require_leader(true)))
                .await
                .map_err(err)?;
            members.push(Member {
                url: url.clone(),
                unary,
                stream,
            });
        }
        if members.is_empty() {
            return Err(ClusterError::Unreachable {
                tried: "no etcd URL given".into(),
            });
        }
        let start = {
            use std::hash::{BuildHasher, Hasher};
            std::collections::hash_map::RandomState::new().build_hasher().finish() as usize % members.len()
        };
        Ok(Pool {
            members,
            current: AtomicUsize::new(start),
            timeouts,
        })
    }

    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn url(&self, i: usize) -> &str {
        &self.members[i].url
    }

    pub fn stream(&self, i: usize) -> Client {
        self.members[i].stream.clone()
    }

    /// The member requests go to first.
    pub fn current(&self) -> usize {
        self.current.load(Ordering::Relaxed)
    }

    /// Member `i` answered: use it from now on.
    pub fn answered(&self, i: usize) {
        self.current.store(i, Ordering::Relaxed);
    }

    /// Member `i` did not answer: if it is the one in use, move on to the next.
    pub fn failed(&self, i: usize) {
        let n = self.members.len();
        let _ = self
            .current
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |c| Some(after_failure(c, i, n)));
    }

    /// Run `f` on a member: the one in use, and on a failure that another member may not
    /// have (see [`classify`]) the next ones, in passes over all members within the
    /// timeouts' budget. Only for requests that may run twice: reads, puts, guarded
    /// transactions, lease grants (a second grant leaks a lease that expires) and revokes.
    pub async fn call<T, F, Fut>(&self, mut f: F) -> Result<T, ClusterError>
    where
        F: FnMut(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let n = self.members.len();
        let start = self.current();
        let t0 = Instant::now();
        // The last failure of each member.
        let mut last: Vec<Option<String>> = vec![None; n];
        for k in 0.. {
            if Timeouts::new_pass(k, n) {
                if t0.elapsed() + self.timeouts.pause >= self.timeouts.budget {
                    break;
                }
                tokio::time::sleep(self.timeouts.pause).await;
            }
            let Some(limit) = self.timeouts.for_try(k, n, t0.elapsed()) else {
                break;
            };
            let i = (start + k) % n;
            let e = match tokio::time::timeout(limit, f(self.members[i].unary.clone())).await {
                Ok(Ok(v)) => {
                    self.answered(i);
                    return Ok(v);
                }
                Ok(Err(e)) if classify(&e) == Verdict::Answer => {
                    return Err(ClusterError::Etcd {
                        endpoints: self.members[i].url.clone(),
                        source: e,
                    })
                }
                Ok(Err(e)) => TryError::Etcd(e),
                Err(_) => TryError::Timeout(limit),
            };
            self.failed(i);
            last[i] = Some(e.to_string());
        }
        let tried = self
            .members
            .iter()
            .zip(last)
            .map(|(m, e)| format!("{}: {}", m.url, e.as_deref().unwrap_or("not tried")))
            .collect::<Vec<_>>()
            .join("; ");
        Err(ClusterError::Unreachable {
            tried: format!("{tried}; for {} ms", t0.elapsed().as_millis()),
        })
    }
}

impl Pool {
    /// Open a watch on member `i` within the pool's try timeout; `None` if the member did
    /// not make it (it is then marked failed). etcd-client asserts that the first answer
    /// is the watch's creation: the opening runs as its own task, so that an unexpected
    /// answer costs this try and not the caller.
    pub async fn open_watch(
        &self,
        i: usize,
        key: &str,
        opts: etcd_client::WatchOptions,
    ) -> Option<(etcd_client::Watcher, etcd_client::WatchStream)> {
        let mut c = self.stream(i);
        let key = key.to_string();
        let mut open = tokio::spawn(async move { c.watch(key, Some(opts)).await });
        match tokio::time::timeout(self.timeouts.try_, &mut open).await {
            Ok(Ok(Ok(w))) => Some(w),
            Ok(Ok(Err(e))) => {
                tracing::debug!(member = self.url(i), "watch: {e}");
                self.failed(i);
                None
            }
            Ok(Err(e)) => {
                tracing::warn!(member = self.url(i), "watch: opening it failed: {e}");
                self.failed(i);
                None
            }
            Err(_) => {
                open.abort();
                self.failed(i);
                None
            }
        }
    }
}
