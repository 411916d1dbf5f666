//! A seeded deterministic simulation of replication (in the style of openraft's and
//! TigerBeetle's simulators): a config master with CAS, one writer and 2..4 replicas as
//! in-memory logs, a network with drops, delays, reordering, duplicates and partitions,
//! crashes that lose what was not durable, planned moves and failovers, clients writing
//! and syncing; every decision by the real `vessel_repl` code. Invariants in `check.rs`.
//!
//! `VESSEL_SIM_SEED=n cargo test --release -p vessel-repl --test sim replay` replays one
//! schedule with its stats; `VESSEL_SIM_SEEDS=n` changes how many the suite runs.

mod check;
mod control;
mod extra;
mod replica;
mod rng;
mod world;
mod writer;

use world::{Stats, World};

const DEFAULT_SEEDS: u64 = 2_000;

/// Run one schedule: `steps` random steps, then heal + quiesce. Err names the violation.
fn run(seed: u64, steps: u64) -> Result<Stats, String> {
    run_with(seed, steps, false)
}

/// `spare`: a schedule with one node outside the replicas that replaces lost ones.
fn run_with(seed: u64, steps: u64, spare: bool) -> Result<Stats, String> {
    let mut w = World::build(seed, spare);
    for _ in 0..steps {
        w.step();
        if let Some(v) = w.check.violations.first() {
            return Err(format!("step {} (t={} ms): {v}", w.stats.steps, w.now));
        }
    }
    w.quiesce().map_err(|v| format!("quiesce (t={} ms): {v}", w.now))?;
    Ok(w.stats)
}

fn steps_for(seed: u64) -> u64 {
    200 + seed % 200
}

#[test]
fn randomized_schedules() {
    schedules(seeds(DEFAULT_SEEDS), false);
}

/// Lost replicas replaced by a spare node (seeded, then added to the in-sync set).
#[test]
fn randomized_schedules_with_a_spare() {
    let total = schedules(seeds(DEFAULT_SEEDS / 2), true);
    assert!(total.replacements > 0 && total.seeds > 0);
}

fn seeds(default: u64) -> u64 {
    std::env::var("VESSEL_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn schedules(n: u64, spare: bool) -> Stats {
    let sp = if spare { " VESSEL_SIM_SPARE=1" } else { "" };
    let mut total = Stats::default();
    let mut failed = Vec::new();
    for seed in 0..n {
        let r = std::panic::catch_unwind(|| run_with(seed, steps_for(seed), spare))
            .unwrap_or_else(|p| Err(format!("panicked: {:?}", p.downcast_ref::<String>())));
        match r {
            Ok(s) => total.add(&s),
            Err(e) => {
                eprintln!("seed {seed} failed: {e}\n  replay: VESSEL_SIM_SEED={seed}{sp} cargo test --release -p vessel-repl --test sim replay");
                failed.push(seed);
            }
        }
    }
    eprintln!("{n} schedules{sp}: {total:?}");
    assert!(failed.is_empty(), "{} schedules failed: seeds {failed:?}", failed.len());
    // The faults did happen (a simulation that injects nothing proves nothing).
    assert!(total.crashes > 0 && total.dropped > 0 && total.duplicated > 0);
    assert!(total.moves > 0 && total.failovers > 0 && total.removals > 0);
    assert!(total.cuts > 0 && total.seeds > 0 && total.syncs_acked > 0);
    total
}

#[test]
fn replay() {
    let Some(seed) = std::env::var("VESSEL_SIM_SEED").ok().and_then(|s| s.parse().ok()) else {
        eprintln!("VESSEL_SIM_SEED not set: nothing to replay");
        return;
    };
    let spare = std::env::var("VESSEL_SIM_SPARE").is_ok_and(|v| v == "1");
    match run_with(seed, steps_for(seed), spare) {
        Ok(s) => eprintln!("seed {seed}: ok {s:?}"),
        Err(e) => panic!("seed {seed}: {e}"),
    }
}

#[test]
fn same_seed_same_schedule() {
    let a = run(7, 300).map(|s| format!("{s:?}"));
    let b = run(7, 300).map(|s| format!("{s:?}"));
    assert_eq!(a, b);
}

/// Run schedules that must pass; each of these failed while the named bug was planted
/// (mutation runs: the rule undone in the code, 2,000 schedules, the first failing seeds
/// kept), so they fail again if the rule is lost.
fn regression(seeds: &[u64]) {
    for &seed in seeds {
        if let Err(e) = run(seed, steps_for(seed)) {
            panic!("seed {seed}: {e}");
        }
    }
}

/// Planted: a sync acknowledged without every in-sync replica's ack.
#[test]
fn regression_ack_waits_for_every_in_sync_replica() {
    regression(&[0, 1, 2]);
}

/// Planted: the divergence point by the high watermark, not the epoch histories.
#[test]
fn regression_divergence_by_epoch_history_not_length() {
    regression(&[0, 1, 2, 3]);
}

/// Planted: a late snapshot replaces a log that already follows the writer (shorter).
#[test]
fn regression_late_snapshot_never_shortens_a_joined_log() {
    regression(&[740, 1013, 1027, 1444, 1891]);
}

/// Planted: a replica re-added to in_sync up to 3 transactions behind.
#[test]
fn regression_add_to_in_sync_only_when_caught_up() {
    regression(&[229, 1788, 1959, 1971]);
}

/// Planted: a writer that restarted resumes writing in its old epoch.
#[test]
fn regression_restarted_writer_waits_for_a_new_epoch() {
    regression(&[15, 24, 52]);
}

/// Planted: min_replicas ignored by the ack decision.
#[test]
fn regression_sync_needs_min_replicas_in_sync() {
    regression(&[25, 33, 81]);
}

/// Planted: a removal applied to the writer's view without the CAS in the store.
#[test]
fn regression_removal_goes_through_the_store() {
    regression(&[4, 11, 13]);
}

/// Planted: a repeated join in an epoch already joined cuts again.
#[test]
fn regression_second_join_in_an_epoch_does_not_cut() {
    regression(&[0, 2, 3]);
}

/// Planted (schedules with a spare): a writer cut off from the store applies a removal to
/// its own view anyway.
#[test]
fn regression_writer_cut_off_from_the_store_removes_nobody() {
    for seed in [456, 732, 936] {
        if let Err(e) = run_with(seed, steps_for(seed), true) {
            panic!("seed {seed} (spare): {e}");
        }
    }
}
