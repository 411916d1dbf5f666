//! The writer's side: a [`Replicator`] is the volume's [`Acks`]. Every committed
//! transaction goes into a bounded in-memory queue; one sender thread per replica streams
//! it (batched, pipelined: it does not wait for an acknowledgement before sending the
//! next batch, within a window) and one reader thread per replica takes the
//! acknowledgements. A replica whose copy is behind what the queue still holds is fed
//! from the volume's log.
//!
//! A sync of seq `s` returns when every replica in the in-sync set has acknowledged `s`
//! durably and the set has at least `min` copies. A replica that has left data
//! unacknowledged (or been unreachable) for longer than the ack timeout is first taken out
//! of the in-sync set in the control store by the [`Master`] (a compare-and-swap on the
//! volume's record); only then does a sync go on without it. When the store says the
//! epoch has moved on, this writer has been replaced: every sync fails from then on.
//! A replica that is out of the set and has caught up with every committed transaction is
//! put back by the same compare-and-swap.

use crate::wire::{self, Frame, Hello, WireError, WIRE_VERSION};
use std::collections::{BTreeMap, VecDeque};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};
use vessel_fs::ack::{AckError, Acks};
use vessel_fs::tx::Tx;
use vessel_fs::Volume;

/// How the writer reaches replicas (the cluster's mutual-TLS transport; sockets in tests).
pub trait Link: Send + Sync {
    /// A replication stream to `node` (its far end runs [`crate::replica::serve`]).
    fn connect(&self, node: &str) -> std::io::Result<Conn>;
}

/// One replication stream: a half to read (the sender's acknowledgement reader has it), a
/// half to write (the sender), and how to end both.
pub struct Conn {
    pub reader: Box<dyn Read + Send>,
    pub writer: Box<dyn Write + Send>,
    /// Ends the stream: a read or write blocked in either half returns.
    pub close: Box<dyn Fn() + Send + Sync>,
}

impl Conn {
    /// A stream over a local socket (tests, and any link that carries a socket's end).
    pub fn socket(s: UnixStream) -> std::io::Result<Conn> {
        let (r, w) = (s.try_clone()?, s.try_clone()?);
        Ok(Conn {
            reader: Box::new(r),
            writer: Box::new(w),
            close: Box::new(move || {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }),
        })
    }
}

/// The configuration master (the control store): in-sync set changes, each a
/// compare-and-swap on the volume's record at this writer's epoch.
pub trait Master: Send + Sync {
    /// Take `node` out of the in-sync set. `Ok(true)`: it is out (or was); `Ok(false)`: the
    /// record is at another epoch (this writer was replaced).
    fn remove_in_sync(&self, node: &str, epoch: u64, reason: &str) -> Result<bool, String>;
    /// Put `node` back into the in-sync set (same answers).
    fn add_in_sync(&self, node: &str, epoch: u64) -> Result<bool, String>;
}

#[derive(Debug, Clone)]
pub struct Options {
    /// Unacknowledged data (or no connection) for this long takes a replica out of the
    /// in-sync set before the next sync is acknowledged.
    pub ack_timeout: Duration,
    /// Encoded transactions kept in memory for the senders (older ones come from the log).
    pub queue_bytes: usize,
    /// Bytes a sender may have in flight without an acknowledgement.
    pub window_bytes: usize,
    /// An idle stream sends an empty batch this often (the replica answers: liveness).
    pub keepalive: Duration,
    /// Wait between connection attempts to an unreachable replica.
    pub retry: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            ack_timeout: Duration::from_secs(2),
            queue_bytes: 64 << 20,
            window_bytes: 32 << 20,
            keepalive: Duration::from_millis(500),
            retry: Duration::from_millis(200),
        }
    }
}

/// How one replica is doing, for `ve show`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaStatus {
    pub node: String,
    pub in_sync: bool,
    /// "streaming", "catching up", "seeding 40% (...)", "connecting", or why it is down.
    pub state: String,
    /// The last seq it holds durably.
    pub acked: u64,
    pub lag_txs: u64,
    pub lag_bytes: u64,
}

#[derive(Debug)]
struct Peer {
    in_sync: bool,
    connected: bool,
    state: String,
    /// The last seq it holds durably (what a sync counts).
    acked: u64,
    /// The last seq it has appended (what liveness counts).
    received: u64,
    /// The highest seq sent on the current connection.
    sent: u64,
    /// The highest seq it was asked to make durable, and since when it has not.
    flush_sent: u64,
    flush_since: Option<Instant>,
    /// When each batch (by its last seq) and each flush request (by its seq) on the
    /// current connection went out, until answered: the timers run from the oldest
    /// unanswered one, so a replica that keeps answering while it falls further behind
    /// is late all the same.
    sent_at: VecDeque<(u64, Instant)>,
    flush_at: VecDeque<(u64, Instant)>,
    /// Since when data has been sent and not acknowledged, or the replica unreachable.
    waiting_since: Option<Instant>,
    /// Changes of the in-sync set under way (one at a time).
    changing: bool,
    /// Bumped to make its threads start over (a new connection).
    conn: u64,
    /// Which sender thread serves it (a replica removed and added again gets a new one).
    id: u64,
}

static PEER_IDS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

impl Peer {
    fn new(in_sync: bool) -> Peer {
        Peer {
            in_sync,
            connected: false,
            state: "connecting".into(),
            acked: 0,
            received: 0,
            sent: 0,
            flush_sent: 0,
            flush_since: None,
            sent_at: VecDeque::new(),
            flush_at: VecDeque::new(),
            waiting_since: Some(Instant::now()),
            changing: false,
            conn: 0,
            id: PEER_IDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        }
    }
}

struct State {
    epoch: u64,
    /// The last seq committed locally.
    committed: u64,
    /// The highest seq a sync waits to have durable on the in-sync replicas.
    want_durable: u64,
    queue: VecDeque<Queued>,
    queue_bytes: usize,
    /// Bytes of every transaction committed since the start (the queue's `end`s count on).
    total_bytes: u64,
    peers: BTreeMap<String, Peer>,
    min: usize,
    deposed: Option<String>,
    stopped: bool,
}

/// A committed transaction, encoded, waiting for the senders.
struct Queued {
    seq: u64,
    /// `State::total_bytes` through this transaction: bytes between two seqs in O(1).
    end: u64,
    enc: Arc<Vec<u8>>,
    /// When it was committed (a lone small one waits up to [`COALESCE`] for its sync).
    at: Instant,
}

/// How long a small batch, with nothing in flight, waits for a sync of it before it goes
/// alone. A write followed by fsync then goes out as one batch with its flush, which the
/// replica answers once: one round trip instead of two. Far below the ~100 ms replicas
/// may trail the writer by.
const COALESCE: Duration = Duration::from_millis(1);

impl State {
    /// Bytes of queued transactions through `seq` (counted from the start; a seq before
    /// the queue counts as its front's start, one past it as everything).
    fn bytes_through(&self, seq: u64) -> u64 {
        let Some(front) = self.queue.front() else {
            return self.total_bytes;
        };
        if seq < front.seq {
            return front.end - front.enc.len() as u64;
        }
        self.queue
            .get((seq - front.seq) as usize)
            .map_or(self.total_bytes, |q| q.end)
    }

    /// Bytes of queued transactions after `from` through `to`.
    fn bytes_between(&self, from: u64, to: u64) -> u64 {
        self.bytes_through(to).saturating_sub(self.bytes_through(from))
    }
}

struct Shared {
    me: String,
    volume: String,
    vol: Weak<Volume>,
    link: Arc<dyn Link>,
    master: Arc<dyn Master>,
    opts: Options,
    st: Mutex<State>,
    cv: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A volume's replication from its writer: set it as the volume's acks
/// (`vol.set_acks(replicator.clone())`), [`Replicator::stop`] it before closing.
pub struct Replicator {
    sh: Arc<Shared>,
}

impl Replicator {
    /// Start replicating `vol` (this node, `me`, is its writer at the volume's epoch) to
    /// `replicas` (node, whether the store has it in the in-sync set).
    pub fn start(
        vol: &Arc<Volume>,
        me: &str,
        replicas: &[(String, bool)],
        min: usize,
        link: Arc<dyn Link>,
        master: Arc<dyn Master>,
        opts: Options,
    ) -> Arc<Replicator> {
        let peers = replicas
            .iter()
            .filter(|(n, _)| n != me)
            .map(|(n, in_sync)| (n.clone(), Peer::new(*in_sync)))
            .collect::<BTreeMap<_, _>>();
        let names: Vec<String> = peers.keys().cloned().collect();
        let sh = Arc::new(Shared {
            me: me.to_string(),
            volume: vol.name().to_string(),
            vol: Arc::downgrade(vol),
            link,
            master,
            opts,
            st: Mutex::new(State {
                epoch: vol.epoch(),
                committed: vol.last_seq(),
                want_durable: 0,
                queue: VecDeque::new(),
                queue_bytes: 0,
                total_bytes: 0,
                peers,
                min: min.max(1),
                deposed: None,
                stopped: false,
            }),
            cv: Condvar::new(),
        });
        for n in names {
            spawn_sender(&sh, n);
        }
        Arc::new(Replicator { sh })
    }

    /// Stop every sender; syncs fail from now on.
    pub fn stop(&self) {
        let mut st = self.sh.lock();
        st.stopped = true;
        drop(st);
        self.sh.cv.notify_all();
    }

    /// The volume's copies changed in the store: senders start for new replicas and end
    /// for removed ones; the in-sync marks follow the store's.
    pub fn set_replicas(&self, replicas: &[(String, bool)]) {
        let mut st = self.sh.lock();
        st.peers.retain(|n, _| replicas.iter().any(|(r, _)| r == n));
        let mut new = Vec::new();
        for (n, in_sync) in replicas.iter().filter(|(n, _)| *n != self.sh.me) {
            match st.peers.get_mut(n) {
                Some(p) => {
                    if !p.changing {
                        p.in_sync = *in_sync;
                    }
                }
                None => {
                    st.peers.insert(n.clone(), Peer::new(*in_sync));
                    new.push(n.clone());
                }
            }
        }
        drop(st);
        self.sh.cv.notify_all();
        for n in new {
            spawn_sender(&self.sh, n);
        }
    }

    /// Change the minimum number of in-sync copies a sync needs.
    pub fn set_min(&self, min: usize) {
        self.sh.lock().min = min.max(1);
        self.sh.cv.notify_all();
    }

    /// Each replica's state (the writer itself is not listed).
    pub fn status(&self) -> Vec<ReplicaStatus> {
        let st = self.sh.lock();
        st.peers
            .iter()
            .map(|(n, p)| {
                let lag_bytes = st.bytes_between(p.acked, st.committed);
                ReplicaStatus {
                    node: n.clone(),
                    in_sync: p.in_sync,
                    state: p.state.clone(),
                    acked: p.acked,
                    lag_txs: st.committed.saturating_sub(p.acked),
                    lag_bytes,
                }
            })
            .collect()
    }

    /// The store says another node writes the volume now: nothing more is acknowledged.
    pub fn depose(&self, why: String) {
        self.sh.lock().deposed.get_or_insert(why);
        self.sh.cv.notify_all();
    }

    pub fn is_stopped(&self) -> bool {
        self.sh.lock().stopped
    }

    /// Why this writer may no longer acknowledge anything, if so.
    pub fn deposed(&self) -> Option<String> {
        self.sh.lock().deposed.clone()
    }
}

impl Drop for Replicator {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Acks for Replicator {
    fn committed(&self, tx: &Tx) {
        let enc = Arc::new(tx.encode());
        let mut st = self.sh.lock();
        st.committed = tx.seq;
        st.queue_bytes += enc.len();
        st.total_bytes += enc.len() as u64;
        let end = st.total_bytes;
        st.queue.push_back(Queued {
            seq: tx.seq,
            end,
            enc,
            at: Instant::now(),
        });
        while st.queue_bytes > self.sh.opts.queue_bytes && st.queue.len() > 1 {
            if let Some(q) = st.queue.pop_front() {
                st.queue_bytes -= q.enc.len();
            }
        }
        drop(st);
        self.sh.cv.notify_all();
    }

    fn syncing(&self, seq: u64) {
        // The replicas' flushes start now, alongside the local fdatasync.
        let mut st = self.sh.lock();
        if seq > st.want_durable {
            st.want_durable = seq;
            drop(st);
            self.sh.cv.notify_all();
        }
    }

    fn wait(&self, seq: u64, timeout: Duration) -> Result<(), AckError> {
        let sh = &self.sh;
        let deadline = Instant::now() + timeout;
        let mut st = sh.lock();
        if seq > st.want_durable {
            st.want_durable = seq;
            sh.cv.notify_all();
        }
        loop {
            if let Some(why) = &st.deposed {
                return Err(AckError::Failed {
                    seq,
                    reason: why.clone(),
                });
            }
            if st.stopped {
                return Err(AckError::Failed {
                    seq,
                    reason: "replication stopped".into(),
                });
            }
            let copies = 1 + st.peers.values().filter(|p| p.in_sync).count();
            let behind: Vec<&String> = st
                .peers
                .iter()
                .filter(|(_, p)| p.in_sync && p.acked < seq)
                .map(|(n, _)| n)
                .collect();
            if behind.is_empty() && copies >= st.min {
                return Ok(());
            }
            // Replicas that hold the sync up for longer than the ack timeout leave the set
            // (in the store first).
            let now = Instant::now();
            let slow: Vec<String> = st
                .peers
                .iter()
                .filter(|(_, p)| {
                    let late = |t: Option<Instant>| t.is_some_and(|t| now.duration_since(t) >= sh.opts.ack_timeout);
                    p.in_sync && p.acked < seq && !p.changing && (late(p.waiting_since) || late(p.flush_since))
                })
                .map(|(n, _)| n.clone())
                .collect();
            if !slow.is_empty() {
                let epoch = st.epoch;
                for n in &slow {
                    if let Some(p) = st.peers.get_mut(n) {
                        p.changing = true;
                    }
                }
                drop(st);
                for n in slow {
                    let why = format!("no acknowledgement within {} ms", sh.opts.ack_timeout.as_millis());
                    let r = sh.master.remove_in_sync(&n, epoch, &why);
                    let mut st = sh.lock();
                    if let Some(p) = st.peers.get_mut(&n) {
                        p.changing = false;
                    }
                    match r {
                        Ok(true) => {
                            tracing::warn!(volume = sh.volume, node = n, "replica out of the in-sync set: {why}");
                            if let Some(p) = st.peers.get_mut(&n) {
                                p.in_sync = false;
                            }
                        }
                        Ok(false) => {
                            st.deposed = Some(format!(
                                "the volume's epoch moved past {epoch}: another node is its writer now"
                            ));
                        }
                        Err(e) => {
                            tracing::warn!(
                                volume = sh.volume,
                                node = n,
                                "taking a replica out of the in-sync set: {e}"
                            );
                        }
                    }
                }
                st = sh.lock();
                continue;
            }
            let now = Instant::now();
            if now >= deadline {
                let why = if copies < st.min {
                    format!("{copies} of the {} copies a sync needs are in sync", st.min)
                } else {
                    format!("waiting for {}", behind_names(&st, seq))
                };
                return Err(AckError::Timeout {
                    seq,
                    waited_ms: timeout.as_millis() as u64,
                    why,
                });
            }
            let step = (deadline - now).min(Duration::from_millis(50));
            st = sh.cv.wait_timeout(st, step).unwrap_or_else(|p| p.into_inner()).0;
        }
    }
}

fn behind_names(st: &State, seq: u64) -> String {
    st.peers
        .iter()
        .filter(|(_, p)| p.in_sync && p.acked < seq)
        .map(|(n, p)| format!("{n} ({})", p.state))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The last seq through which two logs agree (same epoch for every seq), from their
/// epoch histories and last seqs.
fn agree_through(
    w: &vessel_fs::epochs::EpochHistory,
    w_last: u64,
    r: &vessel_fs::epochs::EpochHistory,
    r_last: u64,
) -> u64 {
    crate::diverge::divergence(w, w_last, r, r_last)
}

fn spawn_sender(sh: &Arc<Shared>, node: String) {
    let Some(id) = sh.lock().peers.get(&node).map(|p| p.id) else {
        return;
    };
    let sh = sh.clone();
    let _ = std::thread::Builder::new()
        .name(format!("vessel-repl-{node}"))
        .spawn(move || sender(&sh, &node, id));
}

fn set_state(sh: &Shared, node: &str, f: impl FnOnce(&mut Peer)) {
    let mut st = sh.lock();
    if let Some(p) = st.peers.get_mut(node) {
        f(p);
    }
    drop(st);
    sh.cv.notify_all();
}

fn sender(sh: &Arc<Shared>, node: &str, id: u64) {
    loop {
        {
            let st = sh.lock();
            if st.stopped || st.deposed.is_some() || st.peers.get(node).is_none_or(|p| p.id != id) {
                return;
            }
        }
        let r = stream_once(sh, node);
        let why = match r {
            Ok(()) => continue,
            Err(e) => e.to_string(),
        };
        tracing::debug!(volume = sh.volume, node, "replication stream: {why}");
        set_state(sh, node, |p| {
            p.connected = false;
            p.conn += 1;
            p.state = why;
            p.waiting_since.get_or_insert_with(Instant::now);
        });
        let st = sh.lock();
        let _ = sh.cv.wait_timeout(st, sh.opts.retry);
    }
}

#[derive(Debug, thiserror::Error)]
enum SendError {
    #[error("unreachable: {0}")]
    Connect(std::io::Error),
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("{0}")]
    Other(String),
}

/// One connection: handshake, cut if needed, then stream until something fails.
fn stream_once(sh: &Arc<Shared>, node: &str) -> Result<(), SendError> {
    let vol = sh
        .vol
        .upgrade()
        .ok_or_else(|| SendError::Other("the volume is closed".into()))?;
    let Conn { reader, writer, close } = sh.link.connect(node).map_err(SendError::Connect)?;
    // Every way out of here ends the stream (a reader thread blocked on it returns).
    struct Closing(Box<dyn Fn() + Send + Sync>);
    impl Drop for Closing {
        fn drop(&mut self) {
            (self.0)()
        }
    }
    let _close = Closing(close);
    let mut r = std::io::BufReader::new(reader);
    let mut w = std::io::BufWriter::with_capacity(1 << 20, writer);
    let epoch = sh.lock().epoch;
    let history = vol.epoch_history();
    let hello = Hello {
        version: WIRE_VERSION,
        volume: sh.volume.clone(),
        epoch,
        writer: sh.me.clone(),
        history: history.clone(),
        last_seq: vol.last_seq(),
        first_seq: vol.first_retained_seq(),
    };
    wire::write(&mut w, &Frame::Hello(hello.clone()))?;
    w.flush().map_err(WireError::from)?;
    let mut state = match wire::read(&mut r)? {
        Frame::State(s) => s,
        Frame::Refuse(why) => return Err(WireError::Refused(why).into()),
        other => return Err(WireError::Unexpected(format!("{other:?} in answer to hello")).into()),
    };
    if state.epoch > epoch {
        let mut st = sh.lock();
        st.deposed = Some(format!(
            "replica {node} promised epoch {}, past this writer's {epoch}",
            state.epoch
        ));
        drop(st);
        sh.cv.notify_all();
        return Err(SendError::Other("replaced by a newer writer".into()));
    }
    let mut agree = agree_through(&history, hello.last_seq, &state.history, state.last_seq);
    if agree < state.last_seq {
        tracing::info!(
            volume = sh.volume,
            node,
            agree,
            their_last = state.last_seq,
            "cutting a replica's divergent tail"
        );
        wire::write(&mut w, &Frame::Cut { after: agree })?;
        w.flush().map_err(WireError::from)?;
        state = match wire::read(&mut r)? {
            Frame::State(s) => s,
            Frame::Refuse(why) => return Err(WireError::Refused(why).into()),
            other => return Err(WireError::Unexpected(format!("{other:?} in answer to a cut")).into()),
        };
        if state.last_seq != agree {
            return Err(SendError::Other(format!(
                "the replica's log ends at {} after a cut to {agree}",
                state.last_seq
            )));
        }
    }
    if agree + 1 < hello.first_seq {
        // The log no longer holds what it needs: a snapshot of the base and the log after
        // it, then the tail from where the snapshot ends.
        tracing::info!(
            volume = sh.volume,
            node,
            agree,
            first = hello.first_seq,
            "seeding a replica from a snapshot"
        );
        state = seed(sh, node, &vol, &mut r, &mut w)?;
        agree = agree_through(&vol.epoch_history(), vol.last_seq(), &state.history, state.last_seq);
        if agree != state.last_seq {
            return Err(SendError::Other(format!(
                "the seeded copy's log ends at {} and agrees with this writer's through {agree}",
                state.last_seq
            )));
        }
    }
    let conn = {
        let mut st = sh.lock();
        let Some(p) = st.peers.get_mut(node) else {
            return Ok(());
        };
        p.connected = true;
        p.acked = agree;
        p.received = agree;
        p.sent = agree;
        p.flush_sent = agree;
        p.flush_since = None;
        p.sent_at.clear();
        p.flush_at.clear();
        p.state = "catching up".into();
        // Unique across peers and re-adds: a thread of an older connection never matches.
        p.conn = PEER_IDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        p.conn
    };
    sh.cv.notify_all();
    // Acknowledgements come back on their own thread (the sender never waits for one
    // except when its window is full).
    let acks = {
        let sh = sh.clone();
        let node = node.to_string();
        std::thread::Builder::new()
            .name(format!("vessel-repl-ack-{node}"))
            .spawn(move || read_acks(&sh, &node, conn, &mut r))
            .map_err(|e| SendError::Other(format!("start the acknowledgement reader: {e}")))?
    };
    let r = send_loop(sh, node, conn, &vol, agree + 1, &mut w);
    // The reader's blocking read ends with the stream.
    drop(_close);
    drop(w);
    let _ = acks.join();
    r
}

/// Bytes a snapshot of `vol` takes about (its base's files and its log, holes left out):
/// what seeding progress counts against.
fn snapshot_size(vol: &Volume) -> u64 {
    fn walk(p: &std::path::Path, depth: usize) -> u64 {
        use std::os::unix::fs::MetadataExt;
        let Ok(m) = std::fs::symlink_metadata(p) else { return 0 };
        if m.is_file() {
            return m.blocks() * 512;
        }
        if !m.is_dir() || depth > 8 {
            return 0;
        }
        std::fs::read_dir(p)
            .map(|rd| rd.flatten().map(|e| walk(&e.path(), depth + 1)).sum())
            .unwrap_or(0)
    }
    walk(&vol.dir().join("base"), 0) + walk(&vol.dir().join("txlog"), 0)
}

/// Send a seeding snapshot of `vol` and read the replica's state after it installed it.
fn seed(
    sh: &Shared,
    node: &str,
    vol: &Volume,
    r: &mut impl Read,
    w: &mut impl Write,
) -> Result<wire::State, SendError> {
    let total = snapshot_size(vol).max(1);
    set_state(sh, node, |p| p.state = "seeding 0%".into());
    let mut note = |sent: u64| {
        let pct = (sent * 100 / total).min(99);
        set_state(sh, node, |p| {
            p.state = format!("seeding {pct}% ({} MiB sent)", sent >> 20)
        });
    };
    let mut out = wire::SeedOut::start(w, total, &mut note)?;
    let last = vessel_fs::seed::write_snapshot(vol, &mut out, |_| {})
        .map_err(|e| SendError::Other(format!("the seeding snapshot: {e}")))?;
    let bytes = out.finish()?;
    tracing::info!(volume = sh.volume, node, last, bytes, "seeding snapshot sent");
    set_state(sh, node, |p| p.state = "seeded: installing".into());
    match wire::read(r)? {
        Frame::State(s) => Ok(s),
        Frame::Refuse(why) => Err(WireError::Refused(why).into()),
        other => Err(WireError::Unexpected(format!("{other:?} in answer to a snapshot")).into()),
    }
}

fn read_acks(sh: &Shared, node: &str, conn: u64, r: &mut impl Read) {
    loop {
        let f = wire::read(r);
        let mut st = sh.lock();
        let committed = st.committed;
        let epoch = st.epoch;
        let Some(p) = st.peers.get_mut(node) else { return };
        if p.conn != conn {
            return;
        }
        match f {
            Ok(Frame::Ack { received, durable }) => {
                p.acked = p.acked.max(durable);
                p.received = p.received.max(received);
                // The timers run from the oldest batch (flush request) not yet answered,
                // or stop when all is in.
                let (received, acked) = (p.received, p.acked);
                while p.sent_at.front().is_some_and(|(s, _)| *s <= received) {
                    p.sent_at.pop_front();
                }
                while p.flush_at.front().is_some_and(|(s, _)| *s <= acked) {
                    p.flush_at.pop_front();
                }
                p.waiting_since =
                    (p.received < p.sent).then(|| p.sent_at.front().map_or_else(Instant::now, |(_, t)| *t));
                p.flush_since =
                    (p.acked < p.flush_sent).then(|| p.flush_at.front().map_or_else(Instant::now, |(_, t)| *t));
                let caught_up = p.acked >= committed;
                if caught_up {
                    p.state = "streaming".into();
                }
                if caught_up && !p.in_sync && !p.changing {
                    p.changing = true;
                    drop(st);
                    let r = sh.master.add_in_sync(node, epoch);
                    let mut st = sh.lock();
                    if let Some(p) = st.peers.get_mut(node) {
                        p.changing = false;
                        match r {
                            Ok(true) => {
                                tracing::info!(volume = sh.volume, node, "replica back in the in-sync set");
                                p.in_sync = true;
                            }
                            Ok(false) => {
                                st.deposed = Some(format!(
                                    "the volume's epoch moved past {epoch}: another node is its writer now"
                                ))
                            }
                            Err(e) => tracing::warn!(volume = sh.volume, node, "putting a replica back in sync: {e}"),
                        }
                    }
                    drop(st);
                }
            }
            Ok(Frame::Refuse(why)) => {
                p.state = format!("refused: {why}");
                p.conn += 1;
                p.connected = false;
                p.waiting_since.get_or_insert_with(Instant::now);
                if why.contains("epoch") {
                    tracing::warn!(volume = sh.volume, node, "replica refused this writer: {why}");
                }
                drop(st);
                sh.cv.notify_all();
                return;
            }
            Ok(other) => {
                p.state = format!("unexpected {other:?}");
                p.conn += 1;
                p.connected = false;
                drop(st);
                sh.cv.notify_all();
                return;
            }
            Err(e) => {
                p.state = e.to_string();
                p.conn += 1;
                p.connected = false;
                p.waiting_since.get_or_insert_with(Instant::now);
                drop(st);
                sh.cv.notify_all();
                return;
            }
        }
        sh.cv.notify_all();
    }
}

/// What to send next, taken under the lock: transactions from the queue, or a note that
/// they must come from the log.
enum Next {
    Queue(Vec<(u64, Arc<Vec<u8>>)>),
    /// Ask it to make everything through this seq durable.
    Flush(u64),
    Log {
        through: u64,
    },
    Idle,
    Stop,
}

fn send_loop(
    sh: &Shared,
    node: &str,
    conn: u64,
    vol: &Volume,
    mut next: u64,
    w: &mut impl Write,
) -> Result<(), SendError> {
    let mut last_send = Instant::now();
    loop {
        let (todo, commit) = {
            let mut st = sh.lock();
            loop {
                let Some(p) = st.peers.get(node) else {
                    break (Next::Stop, 0);
                };
                if st.stopped || st.deposed.is_some() || p.conn != conn {
                    break (Next::Stop, 0);
                }
                let in_flight = st.bytes_between(p.received, next - 1) as usize;
                let commit = commit_point(&st);
                // A sync waits for what was sent: durable first, then more data. A copy
                // out of the set that has everything is asked too (then it may rejoin).
                let target = st.want_durable.max(if !p.in_sync && next > st.committed {
                    st.committed
                } else {
                    0
                });
                if target > p.flush_sent && next > target {
                    break (Next::Flush(target), commit);
                }
                // Small batches wait while one is in flight and no sync asks for them
                // (as Nagle's algorithm): the next goes when the replica answers, larger.
                // With nothing in flight, a small one waits a moment for its sync.
                let small = st.want_durable < next
                    && (st.bytes_between(next - 1, st.committed) as usize) < wire::BATCH_BYTES / 4;
                let young = st
                    .queue
                    .front()
                    .and_then(|f| st.queue.get(next.checked_sub(f.seq)? as usize))
                    .map_or(Duration::ZERO, |q| COALESCE.saturating_sub(q.at.elapsed()));
                let hold = small && (in_flight > 0 || !young.is_zero());
                if next <= st.committed && in_flight < sh.opts.window_bytes && !hold {
                    let front = st.queue.front().map_or(u64::MAX, |q| q.seq);
                    if next < front {
                        break (Next::Log { through: st.committed }, commit);
                    }
                    let mut batch = Vec::new();
                    let mut bytes = 0;
                    let from = ((next - front) as usize).min(st.queue.len());
                    for q in st.queue.range(from..) {
                        if bytes >= wire::BATCH_BYTES {
                            break;
                        }
                        bytes += q.enc.len();
                        batch.push((q.seq, q.enc.clone()));
                    }
                    break (Next::Queue(batch), commit);
                }
                if last_send.elapsed() >= sh.opts.keepalive {
                    break (Next::Idle, commit);
                }
                let wait = if small && in_flight == 0 && next <= st.committed && !young.is_zero() {
                    young
                } else {
                    sh.opts.keepalive
                };
                st = sh.cv.wait_timeout(st, wait).unwrap_or_else(|p| p.into_inner()).0;
            }
        };
        match todo {
            Next::Stop => return Ok(()),
            Next::Idle => {
                wire::write_txs(w, commit, &[])?;
                w.flush().map_err(WireError::from)?;
            }
            Next::Flush(through) => {
                wire::write(w, &Frame::Flush { through })?;
                w.flush().map_err(WireError::from)?;
                flush_sent(sh, node, through);
            }
            Next::Queue(batch) => {
                let refs: Vec<&[u8]> = batch.iter().map(|(_, b)| b.as_slice()).collect();
                wire::write_txs(w, commit, &refs)?;
                next = batch.last().map_or(next, |(s, _)| s + 1);
                // A sync waiting for what this batch holds: its flush goes in the same write.
                let flush = {
                    let st = sh.lock();
                    st.peers.get(node).and_then(|p| {
                        (st.want_durable > p.flush_sent && st.want_durable < next).then_some(st.want_durable)
                    })
                };
                if let Some(through) = flush {
                    wire::write(w, &Frame::Flush { through })?;
                }
                w.flush().map_err(WireError::from)?;
                mark_sent(sh, node, next - 1);
                if let Some(through) = flush {
                    flush_sent(sh, node, through);
                }
            }
            Next::Log { through } => {
                next = send_from_log(sh, node, vol, next, through, commit, w)?;
            }
        }
        last_send = Instant::now();
    }
}

fn commit_point(st: &State) -> u64 {
    st.peers
        .values()
        .filter(|p| p.in_sync)
        .map(|p| p.acked)
        .min()
        .unwrap_or(st.committed)
        .min(st.committed)
}

/// A flush request through `through` went out: its timer runs until the answer.
fn flush_sent(sh: &Shared, node: &str, through: u64) {
    let mut st = sh.lock();
    if let Some(p) = st.peers.get_mut(node) {
        p.flush_sent = p.flush_sent.max(through);
        if p.acked < through {
            p.flush_at.push_back((through, Instant::now()));
            p.flush_since.get_or_insert_with(Instant::now);
        }
    }
}

fn mark_sent(sh: &Shared, node: &str, seq: u64) {
    let mut st = sh.lock();
    if let Some(p) = st.peers.get_mut(node) {
        if seq > p.sent {
            if p.received >= p.sent {
                p.waiting_since = Some(Instant::now());
            }
            p.sent_at.push_back((seq, Instant::now()));
            p.sent = seq;
        }
    }
}

/// Catch up from the volume's log: batches from `from` through `through`; returns the
/// next seq to send.
fn send_from_log(
    sh: &Shared,
    node: &str,
    vol: &Volume,
    from: u64,
    through: u64,
    commit: u64,
    w: &mut impl Write,
) -> Result<u64, SendError> {
    let _history = vol.history_guard();
    let reader = vol
        .log_reader()
        .map_err(|e| SendError::Other(format!("read the log to catch a replica up: {e}")))?;
    let mut batch: Vec<Vec<u8>> = Vec::new();
    let mut bytes = 0usize;
    let mut next = from;
    let mut flush = |batch: &mut Vec<Vec<u8>>, bytes: &mut usize, next: u64| -> Result<(), SendError> {
        let refs: Vec<&[u8]> = batch.iter().map(|b| b.as_slice()).collect();
        wire::write_txs(w, commit, &refs)?;
        w.flush().map_err(WireError::from)?;
        batch.clear();
        *bytes = 0;
        mark_sent(sh, node, next - 1);
        Ok(())
    };
    let r = reader.for_each::<SendError>(from, through, |tx, _| {
        let e = tx.encode();
        bytes += e.len();
        batch.push(e);
        next = tx.seq + 1;
        if bytes >= wire::BATCH_BYTES {
            flush(&mut batch, &mut bytes, next)?;
        }
        Ok(true)
    });
    match r {
        Ok(()) => {}
        Err(SendError::Other(m)) => return Err(SendError::Other(m)),
        Err(e) => return Err(e),
    }
    if !batch.is_empty() {
        flush(&mut batch, &mut bytes, next)?;
    }
    if next == from {
        return Err(SendError::Other(format!(
            "the log no longer holds seq {from}: the replica needs a snapshot"
        )));
    }
    Ok(next)
}

impl From<vessel_fs::TxLogError> for SendError {
    fn from(e: vessel_fs::TxLogError) -> Self {
        SendError::Other(format!("read the log: {e}"))
    }
}
