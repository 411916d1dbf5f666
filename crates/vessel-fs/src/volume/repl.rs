//! What replication needs from a volume: the epoch it promised (durable, only raised),
//! the acknowledgement seam, and appending a transaction another node committed.

use super::*;
use crate::ack::Acks;

impl Volume {
    /// The epoch this copy promised: its own commits carry it, and a transaction from an
    /// older epoch is refused.
    pub fn epoch(&self) -> u64 {
        self.lock().epoch
    }

    /// Promise `epoch` (durably, before anything is appended with it). Raising to the
    /// current epoch does nothing; lowering is refused.
    pub fn raise_epoch(&self, epoch: u64) -> Result<()> {
        let mut st = self.lock();
        if epoch < st.epoch {
            return Err(VolumeError::StaleEpoch {
                volume: self.name.clone(),
                current: st.epoch,
                got: epoch,
            });
        }
        if epoch == st.epoch {
            return Ok(());
        }
        let p = self.dir.join("epoch.json");
        let f = EpochFile {
            version: EPOCH_VERSION,
            epoch,
        };
        write_durably(&p, &serde_json::to_vec(&f).expect("serializable")).map_err(self.io("write", &p))?;
        st.epoch = epoch;
        Ok(())
    }

    /// Who else gets committed transactions and what a sync waits for (see [`crate::ack`]).
    pub fn set_acks(&self, acks: Arc<dyn Acks>) {
        self.lock().acks = acks;
    }

    /// How long a sync waits for acknowledgements before it fails with EIO.
    pub fn set_ack_timeout(&self, t: std::time::Duration) {
        self.lock().ack_timeout = t;
    }

    /// Append a transaction the writer committed (this copy is a replica) and apply it to
    /// the tree and the data files, in that order: the log holds it before any file
    /// changes. Its seq must be the next one; an older epoch than the promised one is
    /// refused, a newer one is promised first.
    pub fn append_replicated(&self, tx: &Tx) -> Result<()> {
        self.append_replicated_from(tx.epoch, tx)
    }

    /// [`Volume::append_replicated`] for a transaction sent by the writer of
    /// `writer_epoch`: the writer's epoch is what is fenced (it must not be older than the
    /// promised one, checked under the volume's lock with the append), while the
    /// transaction keeps the epoch it was written in (a catch-up sends old ones), which
    /// may not be newer than its writer's.
    pub fn append_replicated_from(&self, writer_epoch: u64, tx: &Tx) -> Result<()> {
        if writer_epoch > self.epoch() {
            self.raise_epoch(writer_epoch)?;
        }
        let mut st = self.lock();
        let op_err = |m: String| VolumeError::Op(m, self.name.clone());
        if self.broken.load(Ordering::SeqCst) {
            return Err(op_err("an earlier write failed; reopen the volume".into()));
        }
        if writer_epoch < st.epoch {
            return Err(VolumeError::StaleEpoch {
                volume: self.name.clone(),
                current: st.epoch,
                got: writer_epoch,
            });
        }
        if tx.epoch > writer_epoch {
            return Err(op_err(format!(
                "transaction {} is of epoch {}, newer than its writer's {writer_epoch}",
                tx.seq, tx.epoch
            )));
        }
        if tx.seq != st.tree.applied + 1 {
            return Err(op_err(format!(
                "transaction {} does not follow {}: catch up from the writer's log first",
                tx.seq, st.tree.applied
            )));
        }
        let freed = self
            .record(&mut st, tx)
            .map_err(|e| op_err(format!("transaction {} does not apply (errno {e})", tx.seq)))?;
        let freed: Vec<Ino> = freed.into_iter().map(|(i, _)| i).collect();
        let applied = (|| -> std::io::Result<()> {
            if let Some(i) = crate::apply::data_op_ino(&tx.op) {
                let mut shared = std::mem::take(&mut st.shared);
                let r = self.unshare(&mut shared, i);
                st.shared = shared;
                r?;
            }
            crate::apply::apply_data_in(&self.dir.join("data"), self.lower(), &st.tree, &tx.op, &freed, true)
        })();
        if let Err(e) = applied {
            self.broken.store(true, Ordering::SeqCst);
            return Err(self.io("apply a replicated transaction to", &self.dir.join("data"))(e));
        }
        st.dirty.extend(crate::apply::op_ino(&tx.op));
        st.next_ino = st.next_ino.max(st.tree.max_ino + 1);
        Ok(())
    }

    /// Append and apply a batch of transactions the writer committed (each as
    /// [`Volume::append_replicated`]), then make the log durable once (one fdatasync for
    /// the batch, shared with any sync running meanwhile); returns the seq the log is
    /// durable through, which the replica acknowledges. On an error the transactions
    /// before the failing one stay appended (not yet durable: the next batch or sync
    /// covers them).
    pub fn append_replicated_batch(&self, txs: &[Tx]) -> Result<u64> {
        let writer_epoch = txs.iter().map(|t| t.epoch).max().unwrap_or(0);
        self.append_replicated_batch_from(writer_epoch, txs)
    }

    /// [`Volume::append_replicated_batch`] for transactions sent by the writer of
    /// `writer_epoch` (see [`Volume::append_replicated_from`]): the batch of a
    /// replication stream. An empty batch makes nothing new durable and answers the
    /// durable seq.
    pub fn append_replicated_batch_from(&self, writer_epoch: u64, txs: &[Tx]) -> Result<u64> {
        for tx in txs {
            self.append_replicated_from(writer_epoch, tx)?;
        }
        let target = self.lock().tree.applied;
        if self.durable.load(Ordering::Acquire) < target {
            let _g = self.sync_lock.lock().unwrap_or_else(|p| p.into_inner());
            self.sync_locked(target).map_err(|errno| {
                let p = self.dir.join("txlog");
                self.io("fdatasync", &p)(std::io::Error::from_raw_os_error(errno))
            })?;
        }
        Ok(self.durable_through())
    }
}
