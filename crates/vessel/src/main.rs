//! `vessel`: the command line, the node daemon (`vessel daemon`) and the runtime helper
//! (`vessel __runtime`, internal) in one binary. Logic lives in the library crates; this
//! file parses arguments and prints results.

mod commands;
mod lab;
mod output;
mod term;

use clap::{Args, Parser, Subcommand};

use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "vessel",
    version,
    about = "Self-healing hosting cluster: virtual environments on replicated storage"
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Args, Clone)]
pub struct Global {
    /// Node data directory
    #[arg(long, global = true, env = "VESSEL_ROOT", default_value = "/var/lib/vessel")]
    pub root: PathBuf,
    /// Daemon socket (default: /run/vessel/vessel.sock, or ROOT/vessel.sock for a non-default root)
    #[arg(long, global = true, env = "VESSEL_SOCKET")]
    pub socket: Option<PathBuf>,
    /// Print JSON for scripts instead of tables
    #[arg(long, global = true)]
    pub json: bool,
}

impl Global {
    pub fn socket(&self) -> PathBuf {
        self.socket.clone().unwrap_or_else(|| {
            if self.root == std::path::Path::new("/var/lib/vessel") {
                PathBuf::from("/run/vessel/vessel.sock")
            } else {
                self.root.join("vessel.sock")
            }
        })
    }
}

#[derive(Args, Clone)]
pub struct DaemonArgs {
    /// Node bridge VEs attach to
    #[arg(long, env = "VESSEL_BRIDGE", default_value = "vessel0")]
    pub bridge: String,
    /// Node subnet; its first address is the bridge's (the VEs' gateway)
    #[arg(long, env = "VESSEL_SUBNET", default_value = "10.213.0.0/16")]
    pub subnet: vessel_types::Ipv4Cidr,
    /// Parent cgroup of every VE, in each cgroup hierarchy
    #[arg(long, env = "VESSEL_CGROUP_PARENT", default_value = "vessel")]
    pub cgroup_parent: String,
    /// Cache for downloads reused across template builds
    #[arg(long, env = "VESSEL_CACHE_DIR", default_value = "/var/cache/vessel")]
    pub cache_dir: PathBuf,
    /// Static busybox used for the busybox template
    #[arg(long, env = "VESSEL_BUSYBOX", default_value = "/bin/busybox")]
    pub busybox: PathBuf,
    /// Node config: default VE limits, maxima, API bounds (default: ROOT/node.toml if present)
    #[arg(long, env = "VESSEL_CONFIG")]
    pub config: Option<PathBuf>,
}

#[derive(Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once
pub enum Cmd {
    /// Start the node daemon in the background (`--join HOST:PORT --token T`: join a cluster first)
    Up(UpArgs),
    /// Stop the node daemon and its VEs (they start again with `vessel up`)
    Down,
    /// Show what runs on this node
    Status,
    /// Run the node daemon in the foreground
    Daemon(DaemonArgs),
    /// The cluster's nodes: list, show, drain, undrain, remove
    #[command(subcommand)]
    Node(NodeCmd),
    /// The cluster: init (its CA, a join token), token, join
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// Manage templates
    #[command(subcommand)]
    Template(TemplateCmd),
    /// Manage virtual environments
    #[command(subcommand)]
    Ve(VeCmd),
    /// A cluster of N nodes on this machine, for tests, benchmarks and demos
    Lab(LabArgs),
    #[command(name = "__runtime", hide = true)]
    Runtime { request: String },
    #[command(name = "__console-keeper", hide = true)]
    ConsoleKeeper { root: PathBuf },
    /// Serve one vessel-fs volume at a mount point until SIGTERM (tests, benchmarks).
    #[command(name = "__fs-serve", hide = true)]
    FsServe {
        volume: PathBuf,
        mountpoint: PathBuf,
        #[arg(long)]
        template: Option<PathBuf>,
        #[arg(long, default_value_t = 0)]
        uid_base: u32,
        /// Quota of private bytes
        #[arg(long)]
        disk: Option<u64>,
        /// Quota of private inodes
        #[arg(long)]
        inodes: Option<u64>,
        /// History retention in seconds
        #[arg(long)]
        history_secs: Option<u64>,
        /// Log segment size in bytes
        #[arg(long)]
        segment_bytes: Option<u64>,
    },
}

#[derive(Args, Clone)]
pub struct UpArgs {
    #[command(flatten)]
    pub daemon: DaemonArgs,
    /// Join the cluster through this node first (HOST:PORT, as `vessel cluster init` printed)
    #[arg(long, requires = "token")]
    pub join: Option<String>,
    /// The join token (`vessel cluster init` or `vessel cluster token` printed it)
    #[arg(long, requires = "join")]
    pub token: Option<String>,
    /// Use this etcd cluster (client URLs, comma-separated) instead of a private one;
    /// kept in node.toml as `[cluster] etcd`
    #[arg(long, value_delimiter = ',', conflicts_with = "join")]
    pub etcd: Vec<String>,
}

#[derive(Subcommand)]
pub enum ClusterCmd {
    /// Make the cluster's CA on this node, serve other nodes, print a join token
    Init {
        /// How long the join token is valid, e.g. 30m, 1h, 1d
        #[arg(long, default_value = "1h")]
        ttl: String,
    },
    /// Print a new join token (single use)
    Token {
        /// How long it is valid, e.g. 30m, 1h, 1d
        #[arg(long, default_value = "1h")]
        ttl: String,
    },
    /// Join a cluster without starting the daemon (`vessel up --join` does both)
    Join {
        /// The node to join through, HOST:PORT
        target: String,
        #[arg(long)]
        token: String,
        /// Node config to read and write (default: ROOT/node.toml)
        #[arg(long, env = "VESSEL_CONFIG")]
        config: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
pub enum NodeCmd {
    /// Every node of the cluster: state (ready, draining, lost), resources, leader
    List,
    /// One node
    Show { name: String },
    /// Take no new VEs on this node and move its VEs elsewhere
    Drain { name: String },
    /// Take VEs again
    Undrain { name: String },
    /// Forget a lost node and revoke its certificate (a live one is refused)
    Remove {
        name: String,
        /// Even if VEs are placed on it (they stay pending: their files are on that node)
        #[arg(long)]
        force: bool,
    },
}

#[derive(Args)]
pub struct LabArgs {
    /// The lab's name (several labs may run side by side)
    #[arg(long, global = true, env = "VESSEL_LAB", default_value = "lab")]
    pub name: String,
    #[command(subcommand)]
    pub cmd: LabCmd,
}

#[derive(Subcommand)]
pub enum LabCmd {
    /// Make the nodes (namespaces, bridge, etcd members, daemons); returns when all are ready
    Up {
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        /// etcd members, in the first nodes (default: 3 with 3 nodes or more, else 1)
        #[arg(long)]
        etcd_members: Option<usize>,
        /// Tests: stop with an error after a step (network, etcd, daemons)
        #[arg(long, hide = true)]
        fail_after: Option<String>,
    },
    /// The nodes: address, daemon, etcd member, partitions
    Status,
    /// Power loss of a node: kill every process in its cgroup
    Kill { node: String },
    /// Start a killed node again on its data
    Start { node: String },
    /// Cut a node off from the others (or from one) with nftables in its namespace
    Partition {
        node: String,
        #[arg(long)]
        from: Option<String>,
    },
    /// Remove every partition
    Heal,
    /// Run a command inside a node (`vessel` is this binary, set up for the node)
    Exec {
        node: String,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Remove the lab and everything it made
    Down,
}

#[derive(Subcommand)]
pub enum TemplateCmd {
    /// Build a template: busybox (from the host's busybox-static) or debian (Debian 12)
    Build {
        kind: vessel_types::api::TemplateKind,
        /// Register under this name instead of the kind
        #[arg(long)]
        name: Option<vessel_types::Name>,
    },
    List,
    Show {
        name: vessel_types::Name,
    },
    Remove {
        name: vessel_types::Name,
    },
    /// Fetch a template from a node of the cluster that has it (every file verified
    /// against its manifest)
    Fetch {
        name: vessel_types::Name,
        /// From this node (default: any node that has it)
        #[arg(long)]
        from: Option<String>,
    },
}

#[derive(Args, Clone, Default)]
pub struct SpecArgs {
    /// Memory cap, e.g. 256M (a cap, not a reservation)
    #[arg(long)]
    pub memory: Option<String>,
    /// Memory soft mark: reclaimed last under host pressure, e.g. 64M
    #[arg(long)]
    pub memory_low: Option<String>,
    /// CPU quota in CPUs, e.g. 0.5
    #[arg(long, value_parser = parse_cpus)]
    pub cpus: Option<f64>,
    /// Relative CPU weight, 1..10000 (default 100)
    #[arg(long)]
    pub cpu_weight: Option<u64>,
    /// Maximum number of processes and threads
    #[arg(long)]
    pub pids: Option<u64>,
    /// Disk quota for the VE's own files, e.g. 10G (template files are shared, not counted)
    #[arg(long)]
    pub disk: Option<String>,
    /// Quota of the VE's own files and directories (inodes)
    #[arg(long)]
    pub inodes: Option<u64>,
    /// How long the file history is kept, e.g. 24h (default), 7d; older changes are compacted
    #[arg(long)]
    pub history: Option<String>,
    /// Hostname inside the VE (default: the VE name)
    #[arg(long)]
    pub hostname: Option<String>,
    /// Root password as a crypt(3) hash (e.g. from `openssl passwd -6`)
    #[arg(long)]
    pub root_password_hash: Option<String>,
    /// File of SSH public keys for root (repeatable)
    #[arg(long = "ssh-key")]
    pub ssh_key: Vec<PathBuf>,
    /// Environment of the VE's init, KEY=VALUE (repeatable)
    #[arg(long)]
    pub env: Vec<String>,
    /// DNS server for /etc/resolv.conf (repeatable)
    #[arg(long)]
    pub dns: Vec<String>,
    /// Restart policy: no, on-failure, always (always = also start with the node)
    #[arg(long)]
    pub restart: Option<vessel_types::RestartPolicy>,
    /// Copies of the VE's files on distinct nodes, 1-5 (default: 2 on a cluster of 2+ nodes, else 1)
    #[arg(long)]
    pub replicas: Option<u8>,
    /// Copies that must be in sync before a sync inside the VE returns (default: N - N/2)
    #[arg(long)]
    pub min_replicas: Option<u8>,
}

#[derive(Subcommand)]
pub enum VeCmd {
    /// Create a VE from a template
    Create {
        name: vessel_types::Name,
        #[arg(long, short)]
        template: vessel_types::Name,
        /// Address with prefix inside the node subnet (default: next free)
        #[arg(long)]
        ip: Option<vessel_types::Ipv4Cidr>,
        /// Start it right away
        #[arg(long)]
        start: bool,
        /// Put it on this node of the cluster
        #[arg(long)]
        node: Option<String>,
        /// Put it only on nodes with this label (KEY=VALUE; repeatable)
        #[arg(long = "label", value_name = "KEY=VALUE")]
        labels: Vec<String>,
        #[command(flatten)]
        spec: SpecArgs,
    },
    List,
    Show {
        name: vessel_types::Name,
    },
    Start {
        name: vessel_types::Name,
    },
    /// Stop: ask init to shut down, kill after the timeout
    Stop {
        name: vessel_types::Name,
        #[arg(long, default_value_t = 10)]
        timeout: u64,
    },
    Restart {
        name: vessel_types::Name,
        #[arg(long, default_value_t = 10)]
        timeout: u64,
    },
    /// Remove a VE and all its files
    Destroy {
        name: vessel_types::Name,
        /// Stop it first if it runs
        #[arg(long, short)]
        force: bool,
    },
    /// Change limits (live) and OS parameters
    Set {
        name: vessel_types::Name,
        #[command(flatten)]
        spec: SpecArgs,
    },
    /// Run a command in a running VE
    Exec {
        name: vessel_types::Name,
        /// Allocate a terminal
        #[arg(short, long)]
        tty: bool,
        /// Extra environment, KEY=VALUE
        #[arg(short, long)]
        env: Vec<String>,
        /// Working directory inside the VE
        #[arg(short = 'w', long)]
        cwd: Option<String>,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Attach to the VE's console (Ctrl-] detaches)
    Console {
        name: vessel_types::Name,
    },
    /// Show what the VE's init wrote to its console (terminal control characters escaped)
    Logs {
        name: vessel_types::Name,
        /// Only the last N bytes
        #[arg(long)]
        tail: Option<u64>,
        /// The exact bytes, terminal escape sequences included
        #[arg(long)]
        raw: bool,
    },
    /// What the VE changed relative to its template (added, modified, deleted)
    Diff {
        name: vessel_types::Name,
        /// Only under this path
        path: Option<String>,
    },
    /// The changes that touched a path, oldest first
    History {
        name: vessel_types::Name,
        path: String,
    },
    /// Compare the copies of a replicated VE's files (hash trees of each copy; fails when one differs)
    Scrub {
        name: vessel_types::Name,
        /// Drop every copy that differs from the writer's (or could not be compared); a
        /// new copy is made from the writer's and put in sync
        #[arg(long)]
        repair: bool,
    },
    /// Bring one file or directory back (the VE may keep running)
    #[command(group(clap::ArgGroup::new("point").required(true).args(["to", "template"])))]
    Revert {
        name: vessel_types::Name,
        path: String,
        /// Point in time: 10m (ago), 2h, 1d, @UNIX-SECONDS or 2026-11-25T10:00:00Z
        #[arg(long)]
        to: Option<String>,
        /// The template's version
        #[arg(long)]
        template: bool,
    },
    /// Bring the whole VE back to a point in time (stopped for it, started again)
    Rollback {
        name: vessel_types::Name,
        /// Point in time: 10m (ago), 2h, 1d, @UNIX-SECONDS or 2026-11-25T10:00:00Z
        #[arg(long)]
        to: String,
    },
    /// Write a backup of the VE to stdout: `vessel ve export web > web.tar`
    Export {
        name: vessel_types::Name,
    },
    /// Create a VE from a backup on stdin: `vessel ve import [--name N] < web.tar`
    Import {
        /// Name of the new VE (default: the exported one)
        #[arg(long)]
        name: Option<vessel_types::Name>,
        /// Start it right away
        #[arg(long)]
        start: bool,
    },
    /// Boot from the pristine template with the VE's own files at /mnt/ve
    Rescue {
        name: vessel_types::Name,
        /// Return to normal boot
        #[arg(long)]
        end: bool,
    },
    /// Move a VE to another node (cold: stopped, its files and history copied, started
    /// there if it ran)
    Move {
        name: vessel_types::Name,
        /// The node to move it to
        #[arg(long)]
        to: String,
    },
}

/// `--cpus`: a finite number in range (NaN would otherwise travel as JSON `null`, i.e. no cap).
fn parse_cpus(s: &str) -> Result<f64, String> {
    let c: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("'{s}' is not a number of CPUs, e.g. 0.5 or 2"))?;
    let l = vessel_types::Limits {
        cpus: Some(c),
        ..Default::default()
    };
    l.validate().map_err(|e| e.to_string())?;
    Ok(c)
}

/// Parse arguments; usage errors become one line (`vessel: ...`) with exit code 2.
fn parse() -> Cli {
    match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind::*;
            if matches!(
                e.kind(),
                DisplayHelp | DisplayVersion | DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                e.exit();
            }
            let text = e.render().to_string();
            let msg: Vec<&str> = text
                .lines()
                .map(str::trim)
                .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
                .filter(|l| !l.is_empty() && !l.starts_with("tip:"))
                .collect();
            eprintln!(
                "vessel: {} (see `vessel --help`)",
                msg.join(" ").trim_start_matches("error: ")
            );
            std::process::exit(2);
        }
    }
}

fn main() {
    let cli = parse();
    if let Cmd::Runtime { request } = &cli.cmd {
        if let Ok(filter) = std::env::var("VESSEL_RUNTIME_LOG") {
            tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
                .with_writer(std::io::stderr)
                .init();
        }
        std::process::exit(vessel_ve::runtime::helper_main(request));
    }
    if let Cmd::ConsoleKeeper { root } = &cli.cmd {
        if let Err(e) = vessel_agent::keeper::run(root) {
            eprintln!("vessel console keeper: {e}");
            std::process::exit(1);
        }
        std::process::exit(0);
    }
    if let Cmd::FsServe {
        volume,
        mountpoint,
        template,
        uid_base,
        disk,
        inodes,
        history_secs,
        segment_bytes,
    } = &cli.cmd
    {
        let quota = vessel_fs::volume::Quota {
            bytes: *disk,
            inodes: *inodes,
        };
        if let Err(e) = vessel_agent::fsroot::serve(
            volume,
            template.as_deref(),
            mountpoint,
            *uid_base,
            quota,
            *history_secs,
            *segment_bytes,
        ) {
            eprintln!("vessel: {e:#}");
            std::process::exit(1);
        }
        std::process::exit(0);
    }
    match commands::run(cli) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            // What the daemon says can carry names from inside a VE: no raw control bytes.
            let from_daemon = e.chain().any(|c| c.is::<vessel_api::client::ClientError>());
            let text = format!("{e:#}");
            if from_daemon {
                eprintln!("vessel: {}", output::escape(&text));
            } else {
                eprintln!("vessel: {text}");
            }
            std::process::exit(1);
        }
    }
}
