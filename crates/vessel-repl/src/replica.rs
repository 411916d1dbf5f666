//! The replica's end of a replication stream: check the writer's epoch against the one
//! this copy promised, tell the writer where this copy stands, cut a divergent tail when
//! asked, then append and apply every batch of transactions and acknowledge it as
//! received; make it durable when the writer asks (a sync waits for it) or the stream is
//! idle, one fdatasync for everything received, and acknowledge that.
//!
//! A frame from an older epoch than the promised one is refused and ends the stream: a
//! replaced writer never gets anything acknowledged again.

use crate::wire::{self, Frame, SeedIn, State, WireError, WIRE_VERSION};
use std::io::{Read, Write};
use std::path::Path;
use std::sync::Arc;
use vessel_fs::lower::Lower;
use vessel_fs::Volume;

/// Where the replica's copies live (the node agent; a directory in tests).
pub trait ReplicaHost: Send + Sync {
    /// This node's copy of `volume`, open, to append to. Refuse (with the reason the
    /// writer will see) when this node may not be a replica of it now, e.g. it runs the VE.
    fn open(&self, volume: &str) -> Result<Arc<Volume>, String>;

    /// Cut this node's copy of `volume` after `after` (its log and its live state), and
    /// give it back open. `vol` is the open copy: the host closes it first.
    fn cut(&self, volume: &str, vol: Arc<Volume>, after: u64) -> Result<Arc<Volume>, String>;

    /// Replace this node's copy of `volume` by the seeding snapshot read from `snapshot`
    /// (whole or not at all: [`install_copy`]) and give it back open. `vol` is the open
    /// copy: the host closes it first (refuse when another stream uses it).
    fn install(&self, volume: &str, vol: Arc<Volume>, snapshot: &mut dyn Read) -> Result<Arc<Volume>, String>;
}

/// Install a seeding snapshot in place of the copy `vol` (which must be its last
/// reference) and open it. The snapshot goes into a sibling directory first
/// (`vessel_fs::seed::install`: nothing is left of a cut or damaged stream, and the old
/// copy is untouched); only a whole one replaces the old copy, by two renames. A crash
/// between them leaves no copy at all (the next stream seeds an empty one), never a mix.
pub fn install_copy(vol: Arc<Volume>, lower: Option<Arc<Lower>>, snapshot: &mut dyn Read) -> Result<Volume, String> {
    let dir = vol.dir().to_path_buf();
    let parent = dir.parent().unwrap_or(Path::new(".")).to_path_buf();
    let name = dir
        .file_name()
        .map_or_else(|| "volume".into(), |n| n.to_string_lossy().into_owned());
    let fresh = parent.join(format!(".{name}.seeded"));
    let old = parent.join(format!(".{name}.replaced"));
    for d in [&fresh, &old] {
        if d.exists() {
            std::fs::remove_dir_all(d).map_err(|e| format!("remove the leftover {}: {e}", d.display()))?;
        }
    }
    let last = vessel_fs::seed::install(&fresh, &mut &mut *snapshot).map_err(|e| e.to_string())?;
    drop(vol);
    let swap = || -> std::io::Result<()> {
        std::fs::rename(&dir, &old)?;
        std::fs::rename(&fresh, &dir)?;
        std::fs::File::open(&parent)?.sync_all()
    };
    swap().map_err(|e| format!("put the seeded copy in place of {}: {e}", dir.display()))?;
    if let Err(e) = std::fs::remove_dir_all(&old) {
        tracing::warn!("removing the replaced copy {}: {e}", old.display());
    }
    tracing::info!(volume = name, last, "this copy is seeded from a snapshot");
    Volume::open(&dir, lower).map_err(|e| format!("open the seeded copy: {e}"))
}

#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("replica of '{volume}': {reason}")]
    Refused { volume: String, reason: String },
}

/// Where this copy stands, made durable first: the writer counts the `last_seq` it is
/// told as acknowledged durably (a stream that dropped between a batch and its flush
/// left the batch appended but not on disk). The seq is read again after the sync: a
/// stream of an older connection that has not ended yet may still append to the copy,
/// and what it appended meanwhile is not durable.
fn state(vol: &Volume) -> Result<Frame, String> {
    for _ in 0..100 {
        let last = vol.last_seq();
        if vol.durable_through() < last && vol.sync().is_err() {
            return Err("the replica's log could not be made durable".into());
        }
        if vol.last_seq() == last {
            return Ok(Frame::State(State {
                version: WIRE_VERSION,
                epoch: vol.epoch(),
                last_seq: last,
                history: vol.epoch_history(),
            }));
        }
    }
    Err("the copy keeps growing under an older stream: the writer retries".into())
}

fn ack(w: &mut impl Write, vol: &Volume) -> Result<(), WireError> {
    wire::write(
        w,
        &Frame::Ack {
            received: vol.last_seq(),
            durable: vol.durable_through(),
        },
    )?;
    w.flush().map_err(WireError::from)
}

/// Serve one stream from a writer until it ends. Returns the volume's name and the last
/// durable seq on a clean end.
pub fn serve(
    r: &mut std::io::BufReader<impl Read>,
    w: &mut impl Write,
    host: &dyn ReplicaHost,
) -> Result<(String, u64), ReplicaError> {
    let hello = match wire::read(r)? {
        Frame::Hello(h) => h,
        other => return Err(WireError::Unexpected(format!("{other:?} before hello")).into()),
    };
    let volume = hello.volume.clone();
    let refuse = |w: &mut dyn Write, reason: String| -> ReplicaError {
        let mut w = w;
        let _ = wire::write(&mut w, &Frame::Refuse(reason.clone())).and_then(|_| Ok(w.flush()?));
        ReplicaError::Refused {
            volume: volume.clone(),
            reason,
        }
    };
    let mut vol = match host.open(&volume) {
        Ok(v) => v,
        Err(reason) => return Err(refuse(w, reason)),
    };
    if let Err(e) = vol.raise_epoch(hello.epoch) {
        return Err(refuse(
            w,
            format!("writer {} of epoch {}: {e}", hello.writer, hello.epoch),
        ));
    }
    let st = match state(&vol) {
        Ok(s) => s,
        Err(reason) => return Err(refuse(w, reason)),
    };
    wire::write(w, &st)?;
    w.flush().map_err(WireError::from)?;
    let mut buf = Vec::new();
    let mut unanswered = 0;
    loop {
        let f = match wire::read_with(r, &mut buf) {
            Ok(f) => f,
            Err(WireError::Closed) => return Ok((volume, vol.durable_through())),
            Err(e) => return Err(e.into()),
        };
        match f {
            Frame::Cut { after } => {
                tracing::info!(volume, after, "cutting the divergent tail of this replica");
                vol = match host.cut(&volume, vol, after) {
                    Ok(v) => v,
                    Err(reason) => return Err(refuse(w, reason)),
                };
                let st = match state(&vol) {
                    Ok(s) => s,
                    Err(reason) => return Err(refuse(w, reason)),
                };
                wire::write(w, &st)?;
                w.flush().map_err(WireError::from)?;
            }
            Frame::Txs { txs, .. } => {
                // Duplicates of what this copy has (a resent batch) are skipped; the rest
                // must follow on, from a writer whose epoch is still the promised one.
                // Appended and applied now, made durable when the writer asks (a sync
                // waits) or the stream is idle (an empty batch): one fdatasync serves all.
                let last = vol.last_seq();
                let idle = txs.is_empty();
                for tx in txs.iter().filter(|t| t.seq > last) {
                    if let Err(e) = vol.append_replicated_from(hello.epoch, tx) {
                        return Err(refuse(w, format!("transaction {} (epoch {}): {e}", tx.seq, tx.epoch)));
                    }
                }
                if idle && vol.durable_through() < vol.last_seq() && vol.sync().is_err() {
                    return Err(refuse(w, "the replica's log could not be made durable".into()));
                }
                // The next frame is here already (a flush sent with its batch, or more
                // data): its answer covers this batch too, one round trip fewer (a few
                // batches at most, so the writer's timers never wait long).
                if idle || r.buffer().is_empty() || unanswered >= 8 {
                    ack(w, &vol)?;
                    unanswered = 0;
                } else {
                    unanswered += 1;
                }
            }
            Frame::Seed { total } => {
                tracing::info!(volume, total, "receiving a seeding snapshot");
                let mut input = SeedIn::new(r);
                vol = match host.install(&volume, vol, &mut input) {
                    Ok(v) => v,
                    Err(reason) => return Err(refuse(w, format!("seeding: {reason}"))),
                };
                input.finish().map_err(WireError::from)?;
                if let Err(e) = vol.raise_epoch(hello.epoch) {
                    return Err(refuse(
                        w,
                        format!("writer {} of epoch {}: {e}", hello.writer, hello.epoch),
                    ));
                }
                let st = match state(&vol) {
                    Ok(s) => s,
                    Err(reason) => return Err(refuse(w, reason)),
                };
                wire::write(w, &st)?;
                w.flush().map_err(WireError::from)?;
            }
            Frame::Flush { .. } => {
                if vol.sync().is_err() {
                    return Err(refuse(w, "the replica's log could not be made durable".into()));
                }
                ack(w, &vol)?;
                unanswered = 0;
            }
            Frame::Refuse(reason) => {
                return Err(ReplicaError::Refused { volume, reason });
            }
            other => return Err(WireError::Unexpected(format!("{other:?} from the writer")).into()),
        }
    }
}
