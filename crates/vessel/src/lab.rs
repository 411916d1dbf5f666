//! `vessel lab ...`: argument glue over the `vessel-lab` crate.

use crate::{output, Global, LabArgs, LabCmd};
use anyhow::{bail, Context, Result};
use vessel_lab::{Lab, LabPaths, UpOptions};

fn progress(line: &str) {
    eprintln!("{line}");
}

pub fn run(g: &Global, a: LabArgs) -> Result<i32> {
    if !nix::unistd::geteuid().is_root() {
        bail!("vessel lab must run as root (it makes namespaces, cgroups and mounts): run it with sudo");
    }
    let paths = LabPaths::default();
    let exe = std::env::current_exe().context("locate the vessel binary")?;
    let open = || Lab::open(&a.name, &paths, exe.clone());
    match a.cmd {
        LabCmd::Up {
            nodes,
            etcd_members,
            fail_after,
        } => {
            let o = UpOptions {
                name: a.name.clone(),
                nodes,
                etcd_members,
                paths: paths.clone(),
                exe: exe.clone(),
                etcd: vessel_lab::lab::default_etcd(),
                fail_after,
            };
            let lab = Lab::up(&o, &mut progress).with_context(|| {
                format!(
                    "lab {} is not up (logs under {}; `vessel lab down --name {}` removes what was made)",
                    a.name,
                    paths.data_dir(&a.name).display(),
                    a.name
                )
            })?;
            if g.json {
                output::json(&lab.status());
            }
            Ok(0)
        }
        LabCmd::Status => {
            let s = open()?.status();
            if g.json {
                output::json(&s);
                return Ok(0);
            }
            println!(
                "lab {} ({}), net {}, {:?}, etcd {}",
                s.name,
                s.prefix,
                s.net,
                s.phase,
                s.etcd.join(",")
            );
            println!(
                "{:<8} {:<14} {:<6} {:<16} {:<18} PARTITIONED FROM",
                "NODE", "ADDRESS", "STATE", "DAEMON", "ETCD"
            );
            for n in &s.nodes {
                let daemon = match (n.daemon_pid, n.daemon_alive) {
                    (Some(p), true) => format!("pid {p}"),
                    (Some(p), false) => format!("dead ({p})"),
                    (None, _) => "-".into(),
                };
                let etcd = match (n.etcd_member, n.etcd_healthy) {
                    (false, _) => "-".to_string(),
                    (true, Some(true)) => "healthy".into(),
                    (true, _) if n.etcd_alive => "unhealthy".into(),
                    (true, _) => "down".into(),
                };
                let part = if n.partitioned_from.is_empty() {
                    "-".to_string()
                } else {
                    n.partitioned_from.join(",")
                };
                println!(
                    "{:<8} {:<14} {:<6} {:<16} {:<18} {}",
                    n.name, n.address, n.state, daemon, etcd, part
                );
            }
            Ok(0)
        }
        LabCmd::Kill { node } => {
            open()?.kill(&node)?;
            println!("{node} killed (power loss); `vessel lab start {node}` brings it back");
            Ok(0)
        }
        LabCmd::Start { node } => {
            open()?.start(&node, &mut progress)?;
            Ok(0)
        }
        LabCmd::Partition { node, from } => {
            let cut = open()?.partition(&node, from.as_deref())?;
            println!("{node} is cut off from {}; `vessel lab heal` ends it", cut.join(", "));
            Ok(0)
        }
        LabCmd::Heal => {
            let healed = open()?.heal()?;
            if healed.is_empty() {
                println!("no partitions");
            } else {
                println!("healed {}", healed.join(", "));
            }
            Ok(0)
        }
        LabCmd::Exec { node, command } => {
            // The lab's lock is not held while the command runs (it may be `vessel lab ...`).
            let lab = open()?;
            let lab = lab.release();
            Ok(lab.exec(&node, &command)?)
        }
        LabCmd::Down => {
            if !vessel_lab::down(&a.name, &paths, &mut progress)? {
                let others = vessel_lab::lab::labs(&paths);
                println!(
                    "no lab {} on this machine{}",
                    a.name,
                    if others.is_empty() {
                        String::new()
                    } else {
                        format!(" (labs: {})", others.join(", "))
                    }
                );
            }
            Ok(0)
        }
    }
}
