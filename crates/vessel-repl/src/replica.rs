//! The replica's end of a replication stream: check the writer's epoch against the one
//! this copy promised, tell the writer where this copy stands, cut a divergent tail when
//! asked, then append and apply every batch of transactions and acknowledge it as
//! received; make it durable when the writer asks (a sync waits for it) or the stream is
//! idle, one fdatasync for everything received, and acknowledge that.
//!
//! A frame from an older epoch than the promised one is refused and ends the stream: a
//! replaced writer never gets anything acknowledged again.

use crate::wire::{self, Frame, State, WireError, WIRE_VERSION};
use std::io::{Read, Write};
use std::sync::Arc;
use vessel_fs::Volume;

/// Where the replica's copies live (the node agent; a directory in tests).
pub trait ReplicaHost: Send + Sync {
    /// This node's copy of `volume`, open, to append to. Refuse (with the reason the
    /// writer will see) when this node may not be a replica of it now, e.g. it runs the VE.
    fn open(&self, volume: &str) -> Result<Arc<Volume>, String>;

    /// Cut this node's copy of `volume` after `after` (its log and its live state), and
    /// give it back open. `vol` is the open copy: the host closes it first.
    fn cut(&self, volume: &str, vol: Arc<Volume>, after: u64) -> Result<Arc<Volume>, String>;
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
pub fn serve(r: &mut impl Read, w: &mut impl Write, host: &dyn ReplicaHost) -> Result<(String, u64), ReplicaError> {
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
    loop {
        let f = match wire::read(r) {
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
                ack(w, &vol)?;
            }
            Frame::Flush { .. } => {
                if vol.sync().is_err() {
                    return Err(refuse(w, "the replica's log could not be made durable".into()));
                }
                ack(w, &vol)?;
            }
            Frame::Refuse(reason) => {
                return Err(ReplicaError::Refused { volume, reason });
            }
            other => return Err(WireError::Unexpected(format!("{other:?} from the writer")).into()),
        }
    }
}
