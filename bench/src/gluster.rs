//! GlusterFS `replica 3` on a `vessel lab` for `vessel-bench repl`: one glusterd per lab
//! node, one brick per node, and a FUSE mount (`mount -t glusterfs`) on the host.
//!
//! - Each glusterd runs inside its lab node (the node's cgroup and network namespace, via
//!   `vessel lab exec`) in a mount namespace of its own (`unshare --mount`), where a tmpfs
//!   over `/run` and bind mounts of per-node directories under the bench's temp dir over
//!   `/var/lib/glusterd` and `/var/log/glusterfs` keep the three daemons apart (each has its
//!   own UUID, CLI socket and state). Nothing of it is seen in the host's mount namespace.
//! - The bricks are directories under the bench's temp dir (the same disk as ext4's row);
//!   `force` because they sit on the root file system, as TESTING.md says.
//! - The FUSE client is started in node1 (its cgroup and network namespace) but mounts into
//!   the bench's own mount namespace (`nsenter --mount=/proc/<bench>/ns/mnt`), so the
//!   workload runs on the host with exactly the tool ext4's row uses; it reaches only the
//!   lab's addresses, from inside the lab's network namespace.
//!
//! Cleanup on every way out: [`Gluster`]'s Drop detaches the FUSE mount; `lab down` (the
//! lab's own Drop, after this one) kills everything left in the lab's cgroup (glusterd,
//! brick processes, the FUSE client) and the namespaces with their mounts go with it; the
//! temp dir (bricks, state, logs) is removed by its owner last.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use vessel_testkit::lab::TestLab;
use vessel_testkit::run_bounded;

/// The volume's name (inside the lab's own glusterds: no clash with anything else).
const VOLUME: &str = "vbench";

/// A running GlusterFS `replica 3` volume on a lab, mounted at `mnt`.
pub struct Gluster {
    pub mnt: PathBuf,
    /// glusterd pid of node1 (its mount namespace holds the CLI socket).
    cli_pid: u32,
    mounted: bool,
}

/// The Debian packages this target needs, installed like `scripts/deps.sh` does.
pub fn ensure_packages() -> Result<(), String> {
    let missing: Vec<&str> = ["glusterfs-server", "glusterfs-client"]
        .into_iter()
        .filter(|p| {
            let mut c = Command::new("dpkg-query");
            c.args(["-W", "-f=${Status}", p]);
            let o = run_bounded(c, Duration::from_secs(30));
            !String::from_utf8_lossy(&o.stdout).contains("ok installed")
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("repl: installing {}", missing.join(" "));
    let mut c = Command::new("apt-get");
    c.args(["update", "-qq"]).env("DEBIAN_FRONTEND", "noninteractive");
    run_bounded(c, Duration::from_secs(300));
    let mut c = Command::new("apt-get");
    c.args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive");
    let o = run_bounded(c, Duration::from_secs(900));
    if !o.status.success() {
        return Err(format!(
            "apt-get install {}: {}",
            missing.join(" "),
            String::from_utf8_lossy(&o.stderr).trim()
        ));
    }
    Ok(())
}

fn output(o: &std::process::Output) -> String {
    format!(
        "{} {}",
        String::from_utf8_lossy(&o.stdout).trim(),
        String::from_utf8_lossy(&o.stderr).trim()
    )
}

/// The shell script that starts one glusterd in its own mount namespace inside a node.
pub fn glusterd_script(state: &Path) -> String {
    let s = state.display();
    format!(
        "set -e; mount -t tmpfs -o mode=0755 vbench-gluster-run /run; mkdir -p /run/gluster; \
         mkdir -p {s}/lib {s}/log; mount --bind {s}/lib /var/lib/glusterd; \
         mount --bind {s}/log /var/log/glusterfs; \
         exec glusterd -p {s}/glusterd.pid --log-file={s}/log/glusterd.log"
    )
}

/// `gluster volume create` arguments for bricks `dir` on each `addrs`.
pub fn create_args(addrs: &[String], bricks: &[PathBuf]) -> Vec<String> {
    let mut a: Vec<String> = ["volume", "create", VOLUME, "replica"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    a.push(addrs.len().to_string());
    for (ad, b) in addrs.iter().zip(bricks) {
        a.push(format!("{ad}:{}", b.display()));
    }
    a.push("force".into());
    a
}

/// Whether `gluster pool list` output shows `n` peers, all connected.
pub fn pool_ready(list: &str, n: usize) -> bool {
    let rows: Vec<&str> = list
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with("UUID"))
        .collect();
    rows.len() == n && rows.iter().all(|l| l.split_whitespace().last() == Some("Connected"))
}

/// Run a command that leaves a daemon behind (which may keep inherited pipes open): its
/// output goes to `log`, its exit is awaited at most `limit`; Err with the log's tail.
fn run_daemonizing(mut c: Command, log: &Path, limit: Duration) -> Result<(), String> {
    let f = std::fs::File::create(log).map_err(|e| format!("create {}: {e}", log.display()))?;
    let f2 = f.try_clone().map_err(|e| format!("{}: {e}", log.display()))?;
    let shown = format!("{c:?}");
    let mut child = c
        .stdout(f)
        .stderr(f2)
        .spawn()
        .map_err(|e| format!("start {shown}: {e}"))?;
    let t = Instant::now();
    let st = loop {
        match child.try_wait() {
            Ok(Some(st)) => break st,
            Ok(None) if t.elapsed() > limit => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("{shown}: not done within {limit:?}"));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(format!("wait for {shown}: {e}")),
        }
    };
    if st.success() {
        return Ok(());
    }
    let text = std::fs::read_to_string(log).unwrap_or_default();
    Err(format!("{shown}: {st}: {}", text.trim()))
}

fn read_pid(p: &Path, limit: Duration) -> Result<u32, String> {
    let t = Instant::now();
    for _ in 0..1000 {
        if let Some(pid) = std::fs::read_to_string(p).ok().and_then(|s| s.trim().parse().ok()) {
            return Ok(pid);
        }
        if t.elapsed() > limit {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(format!("no pid in {} within {limit:?}", p.display()))
}

impl Gluster {
    /// `gluster ARGS` in node1's glusterd namespaces.
    fn cli(&self, args: &[&str]) -> std::process::Output {
        let mut c = Command::new("nsenter");
        c.arg("-t")
            .arg(self.cli_pid.to_string())
            .args(["-m", "-n", "--", "gluster", "--mode=script"])
            .args(args);
        run_bounded(c, Duration::from_secs(120))
    }

    fn cli_ok(&self, args: &[&str]) -> Result<String, String> {
        let o = self.cli(args);
        if o.status.success() {
            Ok(String::from_utf8_lossy(&o.stdout).into_owned())
        } else {
            Err(format!("gluster {}: {}", args.join(" "), output(&o)))
        }
    }

    /// Start glusterd on the lab's nodes, make the volume from bricks under `base` and
    /// mount it at `base/gluster-mnt`. `addrs`: the nodes' lab addresses, node1 first.
    pub fn start(lab: &TestLab, nodes: &[&str], addrs: &[String], base: &Path) -> Result<Gluster, String> {
        let mut pids = Vec::new();
        let mut bricks = Vec::new();
        for n in nodes {
            let state = base.join(format!("gluster-{n}"));
            std::fs::create_dir_all(&state).map_err(|e| format!("create {}: {e}", state.display()))?;
            let brick = base.join(format!("brick-{n}/b"));
            std::fs::create_dir_all(&brick).map_err(|e| format!("create {}: {e}", brick.display()))?;
            bricks.push(brick);
            let c = lab.cmd(&[
                "exec",
                n,
                "--",
                "unshare",
                "--mount",
                "--propagation",
                "slave",
                "sh",
                "-c",
                &glusterd_script(&state),
            ]);
            run_daemonizing(c, &state.join("start.log"), Duration::from_secs(60))
                .map_err(|e| format!("glusterd on {n}: {e}"))?;
            pids.push(read_pid(&state.join("glusterd.pid"), Duration::from_secs(30))?);
        }
        let mut g = Gluster {
            mnt: base.join("gluster-mnt"),
            cli_pid: pids[0],
            mounted: false,
        };
        // glusterd answers its CLI socket a moment after it wrote its pid.
        let t = Instant::now();
        while g.cli(&["peer", "status"]).status.code() != Some(0) {
            if t.elapsed() > Duration::from_secs(30) {
                return Err("glusterd on node1 does not answer its CLI within 30 s".into());
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        for a in &addrs[1..] {
            g.cli_ok(&["peer", "probe", a])?;
        }
        let t = Instant::now();
        loop {
            let list = g.cli_ok(&["pool", "list"]).unwrap_or_default();
            if pool_ready(&list, nodes.len()) {
                break;
            }
            if t.elapsed() > Duration::from_secs(60) {
                return Err(format!("gluster peers not all connected within 60 s: {list}"));
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        let args = create_args(addrs, &bricks);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        g.cli_ok(&args)?;
        g.cli_ok(&["volume", "start", VOLUME])?;
        let info = g.cli_ok(&["volume", "info", VOLUME])?;
        for l in info
            .lines()
            .filter(|l| l.starts_with("Type") || l.starts_with("Number") || l.starts_with("Brick"))
        {
            eprintln!("repl: glusterfs {l}");
        }
        std::fs::create_dir_all(&g.mnt).map_err(|e| format!("create {}: {e}", g.mnt.display()))?;
        // The client: node1's cgroup and network, the bench's own mount namespace.
        let me = format!("/proc/{}/ns/mnt", std::process::id());
        let log = base.join("gluster-client.log");
        let src = format!("{}:/{VOLUME}", addrs[0]);
        let t = Instant::now();
        loop {
            let c = lab.cmd(&[
                "exec",
                nodes[0],
                "--",
                "nsenter",
                &format!("--mount={me}"),
                "--",
                "mount",
                "-t",
                "glusterfs",
                "-o",
                &format!("log-file={}", log.display()),
                &src,
                &g.mnt.display().to_string(),
            ]);
            let r = run_daemonizing(c, &base.join("gluster-mount.log"), Duration::from_secs(60));
            if r.is_ok() && is_fuse(&g.mnt) {
                g.mounted = true;
                break;
            }
            if t.elapsed() > Duration::from_secs(60) {
                return Err(format!(
                    "mount -t glusterfs {src}: {r:?} (client log {})",
                    log.display()
                ));
            }
            std::thread::sleep(Duration::from_secs(1));
        }
        Ok(g)
    }
}

/// Whether `p` is a FUSE mount point in this mount namespace.
fn is_fuse(p: &Path) -> bool {
    let want = p.display().to_string();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| {
            let mut f = l.split(' ');
            f.nth(4) == Some(want.as_str()) && l.contains(" - fuse")
        })
}

impl Drop for Gluster {
    fn drop(&mut self) {
        if self.mounted {
            if let Ok(c) = std::ffi::CString::new(self.mnt.as_os_str().as_encoded_bytes()) {
                // SAFETY: NUL-terminated path of a mount this benchmark made.
                unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            }
        }
        // glusterd, the bricks and the client are in the lab's cgroup: `lab down` kills them.
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_create_names_one_brick_per_node_and_forces() {
        let a = create_args(
            &["10.9.0.1".into(), "10.9.0.2".into(), "10.9.0.3".into()],
            &[PathBuf::from("/t/b1"), PathBuf::from("/t/b2"), PathBuf::from("/t/b3")],
        );
        assert_eq!(
            a,
            [
                "volume",
                "create",
                "vbench",
                "replica",
                "3",
                "10.9.0.1:/t/b1",
                "10.9.0.2:/t/b2",
                "10.9.0.3:/t/b3",
                "force"
            ]
        );
    }

    #[test]
    fn pool_is_ready_only_with_every_peer_connected() {
        let head = "UUID\t\t\t\t\tHostname \tState\n";
        let ok = format!("{head}a\t10.9.0.2\tConnected \nb\t10.9.0.3\tConnected \nc\tlocalhost\tConnected \n");
        assert!(pool_ready(&ok, 3));
        let one_down = ok.replacen("Connected", "Disconnected", 1);
        assert!(!pool_ready(&one_down, 3));
        assert!(!pool_ready(&format!("{head}c\tlocalhost\tConnected \n"), 3));
    }

    #[test]
    fn glusterd_is_kept_in_its_own_dirs() {
        let s = glusterd_script(Path::new("/var/tmp/x/gluster-node2"));
        assert!(s.contains("mount --bind /var/tmp/x/gluster-node2/lib /var/lib/glusterd"));
        assert!(s.contains("mount -t tmpfs"));
        assert!(s.contains("-p /var/tmp/x/gluster-node2/glusterd.pid"));
    }
}
