//! What each command does: build a request, send it, print the reply.

use crate::output::{self, Progress};
use crate::{Cli, ClusterCmd, Cmd, DaemonArgs, Global, NodeCmd, SpecArgs, TemplateCmd, UpArgs, VeCmd};
use anyhow::{bail, Context, Result};
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::process::CommandExt;
use std::process::Stdio;
use std::time::{Duration, Instant};
use vessel_api::client::ClientError;
use vessel_api::Client;
use vessel_types::api::{NodeStatus, Request, Response, VeChange, VeInfo};
use vessel_types::size::{format_size, parse_size};
use vessel_types::{Limits, VeSpec};

pub fn run(cli: Cli) -> Result<i32> {
    let g = cli.global;
    match cli.cmd {
        Cmd::Up(a) => up_join(&g, &a),
        Cmd::Cluster(c) => cluster(&g, c),
        Cmd::Down => down(&g),
        Cmd::Status => status(&g),
        Cmd::Daemon(a) => daemon(&g, &a),
        Cmd::Node(n) => node(&g, n),
        Cmd::Template(t) => template(&g, t),
        Cmd::Ve(v) => ve(&g, v),
        Cmd::Lab(l) => crate::lab::run(&g, l),
        Cmd::Runtime { .. } | Cmd::ConsoleKeeper { .. } | Cmd::FsServe { .. } => unreachable!("handled in main"),
    }
}

fn connect(g: &Global) -> Result<Client> {
    Ok(Client::connect(&g.socket())?)
}

fn node_options(g: &Global, a: &DaemonArgs) -> Result<vessel_agent::NodeOptions> {
    let root = if g.root.is_absolute() {
        g.root.clone()
    } else {
        std::env::current_dir()?.join(&g.root)
    };
    Ok(vessel_agent::NodeOptions {
        config_file: config_file(&root, a)?,
        root,
        socket: g.socket(),
        config: vessel_agent::state::NodeConfig {
            bridge: a.bridge.clone(),
            subnet: a.subnet,
            cgroup_parent: a.cgroup_parent.clone(),
        },
        cache_dir: a.cache_dir.clone(),
        exe: std::env::current_exe().context("locate the vessel binary")?,
        cgroup_root: "/sys/fs/cgroup".into(),
        busybox: a.busybox.clone(),
        settings: Default::default(),
    })
}

/// The node config file: `--config` (made absolute) or ROOT/node.toml.
fn config_file(root: &std::path::Path, a: &DaemonArgs) -> Result<vessel_agent::config::ConfigFile> {
    let explicit = match &a.config {
        Some(p) if p.is_relative() => Some(std::env::current_dir()?.join(p)),
        p => p.clone(),
    };
    Ok(vessel_agent::config::ConfigFile::resolve(root, explicit.as_deref()))
}

fn require_root() -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("the vessel daemon must run as root (it creates namespaces, mounts and cgroups): run it with sudo");
    }
    Ok(())
}

fn validate_daemon_args(a: &DaemonArgs) -> Result<()> {
    if a.bridge.is_empty()
        || a.bridge.len() > 15
        || !a
            .bridge
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        bail!("bridge name '{}' must be 1-15 letters, digits, '-' or '_'", a.bridge);
    }
    if a.subnet.prefix > 30 {
        bail!("subnet {} is too small: use a prefix of /30 or shorter", a.subnet);
    }
    if a.cgroup_parent.is_empty() || a.cgroup_parent.contains("..") || a.cgroup_parent.starts_with('/') {
        bail!(
            "cgroup parent '{}' must be a relative path without '..'",
            a.cgroup_parent
        );
    }
    Ok(())
}

fn daemon(g: &Global, a: &DaemonArgs) -> Result<i32> {
    require_root()?;
    validate_daemon_args(a)?;
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("VESSEL_LOG").unwrap_or_else(|_| "info,fuser=error".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    vessel_agent::daemon::run(node_options(g, a)?)?;
    Ok(0)
}

fn current_status(g: &Global) -> Result<Option<NodeStatus>> {
    let c = match Client::connect(&g.socket()) {
        Ok(c) => c,
        Err(ClientError::NotRunning(_)) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    match c.call(&Request::Status)? {
        Response::Status(s) => Ok(Some(s)),
        r => bail!("unexpected reply {r:?}"),
    }
}

fn up(g: &Global, a: &DaemonArgs) -> Result<i32> {
    require_root()?;
    validate_daemon_args(a)?;
    if let Some(s) = current_status(g)? {
        bail!(
            "the vessel daemon already runs (pid {}, socket {}): `vessel down` stops it",
            s.pid,
            s.socket
        );
    }
    // A bad node config is reported here, not only in the daemon's log.
    let opts = node_options(g, a)?;
    vessel_agent::config::load(&opts.config_file)?;
    std::fs::create_dir_all(&g.root).with_context(|| format!("create {}", g.root.display()))?;
    let log_path = vessel_ve::Layout::new(&g.root).daemon_log();
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("open {}", log_path.display()))?;
    let exe = std::env::current_exe()?;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("--root")
        .arg(&g.root)
        .arg("--socket")
        .arg(g.socket())
        .arg("daemon");
    cmd.arg("--bridge")
        .arg(&a.bridge)
        .arg("--subnet")
        .arg(a.subnet.to_string());
    cmd.arg("--cgroup-parent")
        .arg(&a.cgroup_parent)
        .arg("--cache-dir")
        .arg(&a.cache_dir)
        .arg("--busybox")
        .arg(&a.busybox);
    if opts.config_file.required {
        cmd.arg("--config").arg(&opts.config_file.path);
    }
    cmd.stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
    // SAFETY: setsid in the forked child detaches the daemon from our terminal and session.
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid().map_err(std::io::Error::from)?;
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("start the daemon")?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(st) = child.try_wait()? {
            let tail = std::fs::read_to_string(&log_path).unwrap_or_default();
            let tail: Vec<&str> = tail.lines().rev().take(5).collect();
            bail!(
                "the daemon exited at start ({st}); last log lines:\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        if let Ok(Some(s)) = current_status(g) {
            if g.json {
                output::json(&s);
            } else {
                println!(
                    "vessel daemon running (pid {}), socket {}, log {}",
                    s.pid,
                    s.socket,
                    log_path.display()
                );
            }
            return Ok(0);
        }
        if Instant::now() > deadline {
            bail!("the daemon did not answer within 60 s; see {}", log_path.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `vessel up [--join HOST:PORT --token T]`.
fn up_join(g: &Global, a: &UpArgs) -> Result<i32> {
    if let (Some(target), Some(token)) = (&a.join, &a.token) {
        require_root()?;
        if let Some(s) = current_status(g)? {
            bail!(
                "the vessel daemon already runs (pid {}): `vessel down` first, then `vessel up --join ...`",
                s.pid
            );
        }
        let opts = node_options(g, &a.daemon)?;
        join_now(g, &opts.root, &opts.config_file, target, token)?;
    }
    if !a.etcd.is_empty() {
        require_root()?;
        if let Some(s) = current_status(g)? {
            bail!(
                "the vessel daemon already runs (pid {}): `vessel down` first, then `vessel up --etcd ...`",
                s.pid
            );
        }
        let opts = node_options(g, &a.daemon)?;
        std::fs::create_dir_all(&opts.root).with_context(|| format!("create {}", opts.root.display()))?;
        vessel_agent::join::write_cluster_config(&opts.config_file.path, None, &a.etcd)
            .map_err(|e| anyhow::anyhow!("--etcd: {e}"))?;
    }
    up(g, &a.daemon)
}

fn join_now(
    g: &Global,
    root: &std::path::Path,
    config: &vessel_agent::config::ConfigFile,
    target: &str,
    token: &str,
) -> Result<()> {
    std::fs::create_dir_all(root).with_context(|| format!("create {}", root.display()))?;
    let j = vessel_agent::join::join(root, config, target, token).map_err(anyhow::Error::msg)?;
    if !g.json {
        println!(
            "joined the cluster as {} (admitted by {}); etcd {}",
            j.name,
            j.by,
            j.etcd.join(",")
        );
    }
    Ok(())
}

fn cluster(g: &Global, c: ClusterCmd) -> Result<i32> {
    let ttl = |t: &str| -> Result<u64> {
        let s = vessel_types::time::parse_duration_secs(t).map_err(anyhow::Error::msg)?;
        if s == 0 {
            bail!("--ttl must be at least 1s");
        }
        Ok(s)
    };
    let req = match &c {
        ClusterCmd::Init { ttl: t } => Request::ClusterInit {
            token_ttl_secs: ttl(t)?,
        },
        ClusterCmd::Token { ttl: t } => Request::ClusterToken { ttl_secs: ttl(t)? },
        ClusterCmd::Join { target, token, config } => {
            require_root()?;
            if current_status(g)?.is_some() {
                bail!("the vessel daemon runs: `vessel down` first (joining changes its etcd)");
            }
            let root = if g.root.is_absolute() {
                g.root.clone()
            } else {
                std::env::current_dir()?.join(&g.root)
            };
            let explicit = match config {
                Some(p) if p.is_relative() => Some(std::env::current_dir()?.join(p)),
                p => p.clone(),
            };
            let file = vessel_agent::config::ConfigFile::resolve(&root, explicit.as_deref());
            join_now(g, &root, &file, target, token)?;
            if g.json {
                output::json(&serde_json::json!({"joined": true}));
            } else {
                println!("start the node with `vessel up`");
            }
            return Ok(0);
        }
    };
    let info = match connect(g)?.call(&req)? {
        Response::JoinToken(i) => i,
        r => bail!("unexpected reply {r:?}"),
    };
    if g.json {
        output::json(&info);
        return Ok(0);
    }
    if matches!(c, ClusterCmd::Init { .. }) {
        println!("cluster initialized: this node serves other nodes on {}", info.join);
    }
    println!(
        "join token (single use, valid {}): {}",
        vessel_types::time::format_duration_secs(info.ttl_secs),
        info.token
    );
    println!("on the new machine run:\n  {}", info.command);
    Ok(0)
}

fn down(g: &Global) -> Result<i32> {
    let Some(s) = current_status(g)? else {
        println!("vessel daemon is not running");
        return Ok(0);
    };
    let pid = nix::unistd::Pid::from_raw(s.pid as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).context("signal the daemon")?;
    eprintln!("stopping the running VEs and the daemon ...");
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::path::Path::new(&format!("/proc/{}", s.pid)).exists() && Instant::now() < deadline {
        // A zombie (our parent is not its parent) counts as gone.
        if std::fs::read_to_string(format!("/proc/{}/stat", s.pid)).is_ok_and(|st| st.contains(") Z ")) {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    println!("vessel daemon stopped; the VEs that were running start again with `vessel up`");
    Ok(0)
}

fn status(g: &Global) -> Result<i32> {
    match current_status(g)? {
        None => {
            if g.json {
                output::json(&serde_json::json!({"running": false, "socket": g.socket()}));
            } else {
                println!(
                    "vessel daemon: not running (socket {}); start it with `vessel up`",
                    g.socket().display()
                );
            }
            Ok(3)
        }
        Some(s) => {
            if g.json {
                let mut v = serde_json::to_value(&s)?;
                v["running"] = true.into();
                output::json(&v);
            } else {
                println!(
                    "vessel daemon: running (pid {}, up {}s, version {})",
                    s.pid, s.uptime_secs, s.version
                );
                println!("root:      {}", output::escape(&s.root));
                println!("socket:    {}", output::escape(&s.socket));
                println!("network:   bridge {} subnet {}", output::escape(&s.bridge), s.subnet);
                println!("cgroups:   {}", s.cgroup);
                println!("VEs:       {} running of {}", s.ves_running, s.ves_total);
                println!("templates: {}", s.templates);
            }
            Ok(0)
        }
    }
}

fn node(g: &Global, n: NodeCmd) -> Result<i32> {
    let change = match &n {
        NodeCmd::Drain { name } => Some(Request::NodeDrain {
            name: name.clone(),
            drain: true,
        }),
        NodeCmd::Undrain { name } => Some(Request::NodeDrain {
            name: name.clone(),
            drain: false,
        }),
        NodeCmd::Remove { name, force } => Some(Request::NodeRemove {
            name: name.clone(),
            force: *force,
        }),
        _ => None,
    };
    if let Some(req) = change {
        match connect(g)?.call(&req)? {
            Response::Ok => return Ok(0),
            r => bail!("unexpected reply {r:?}"),
        }
    }
    let view = match connect(g)?.call(&Request::NodeList)? {
        Response::Cluster(v) => v,
        r => bail!("unexpected reply {r:?}"),
    };
    let since = |ns: i64| output::ago((ns.max(0) / 1_000_000_000) as u64);
    match n {
        NodeCmd::List if g.json => output::json(&view),
        NodeCmd::List => {
            let rows: Vec<Vec<String>> = view
                .nodes
                .iter()
                .map(|n| {
                    vec![
                        n.node.name.clone(),
                        n.state.clone(),
                        if n.leader { "*".into() } else { String::new() },
                        n.ves.to_string(),
                        n.node.cpus.to_string(),
                        format!("{}/{}", format_size(n.memory_requested), format_size(n.node.memory)),
                        format_size(n.node.disk),
                        heartbeat(n),
                        n.node.version.clone(),
                        since(n.node.since_ns),
                    ]
                })
                .collect();
            output::table(
                &[
                    "NAME",
                    "STATE",
                    "LEADER",
                    "VES",
                    "CPUS",
                    "MEMORY REQ/ALLOC",
                    "DISK",
                    "HEARTBEAT",
                    "VERSION",
                    "SINCE",
                ],
                &rows,
            );
            if let Some(p) = &view.problem {
                eprintln!("this node ({}): {p}", view.this_node);
            }
        }
        NodeCmd::Drain { .. } | NodeCmd::Undrain { .. } | NodeCmd::Remove { .. } => unreachable!("handled above"),
        NodeCmd::Show { name } => {
            let Some(n) = view.nodes.iter().find(|n| n.node.name == name) else {
                bail!(
                    "no node {} in the cluster: `vessel node list` shows them",
                    output::escape(&name)
                );
            };
            if g.json {
                output::json(n);
            } else {
                println!("name:     {}", n.node.name);
                println!("state:    {}", n.state);
                println!("leader:   {}", if n.leader { "yes" } else { "no" });
                println!("heartbeat: {}", heartbeat(n));
                println!("ves:      {}", n.ves);
                println!("cpus:     {}", n.node.cpus);
                println!(
                    "memory:   {} requested by its VEs of {}",
                    format_size(n.memory_requested),
                    format_size(n.node.memory)
                );
                println!("disk:     {}", format_size(n.node.disk));
                println!("version:  {}", n.node.version);
                println!("since:    {}", since(n.node.since_ns));
                let labels: Vec<String> = n.node.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                println!("labels:   {}", labels.join(" "));
                println!(
                    "etcd:     {}{}",
                    view.etcd.join(","),
                    if view.private_etcd {
                        " (private, this node's)"
                    } else {
                        ""
                    }
                );
            }
        }
    }
    Ok(0)
}

/// When a node last renewed its lease, as `node list` shows it.
fn heartbeat(n: &vessel_types::api::ClusterNode) -> String {
    match n.heartbeat_secs_ago {
        Some(0) => "<1s ago".into(),
        Some(s) => format!("{s}s ago"),
        None if n.state == "lost" => "none (lost)".into(),
        None => "-".into(),
    }
}

fn template(g: &Global, t: TemplateCmd) -> Result<i32> {
    let c = connect(g)?;
    match t {
        TemplateCmd::Build { kind, name } => {
            let mut p = Progress::new();
            let r = c.call_with_progress(&Request::TemplateBuild { kind, name }, &mut |m, d, t| p.update(m, d, t));
            p.finish();
            match r? {
                Response::Template(t) if g.json => output::json(&t),
                Response::Template(t) => println!(
                    "template {} built: {} files, {}, id {}",
                    t.name,
                    t.files,
                    format_size(t.bytes),
                    t.id
                ),
                r => bail!("unexpected reply {r:?}"),
            }
        }
        TemplateCmd::List => match c.call(&Request::TemplateList)? {
            Response::Templates { templates } if g.json => output::json(&templates),
            Response::Templates { templates } => {
                let rows: Vec<Vec<String>> = templates
                    .iter()
                    .map(|t| {
                        vec![
                            t.name.to_string(),
                            format!("{:?}", t.kind).to_lowercase(),
                            t.id.chars().take(12).collect(),
                            t.files.to_string(),
                            format_size(t.bytes),
                            t.used_by.len().to_string(),
                            output::ago(t.created_unix),
                        ]
                    })
                    .collect();
                output::table(&["NAME", "KIND", "ID", "FILES", "SIZE", "VES", "CREATED"], &rows);
            }
            r => bail!("unexpected reply {r:?}"),
        },
        TemplateCmd::Show { name } => match c.call(&Request::TemplateShow { name })? {
            Response::Template(t) if g.json => output::json(&t),
            Response::Template(t) => {
                println!("name:    {}", t.name);
                println!("kind:    {:?}", t.kind);
                println!("id:      {}", t.id);
                println!("files:   {}", t.files);
                println!("size:    {}", format_size(t.bytes));
                println!(
                    "used by: {}",
                    t.used_by.iter().map(|n| n.to_string()).collect::<Vec<_>>().join(", ")
                );
            }
            r => bail!("unexpected reply {r:?}"),
        },
        TemplateCmd::Remove { name } => {
            c.call(&Request::TemplateRemove { name: name.clone() })?;
            println!("template {name} removed");
        }
        TemplateCmd::Fetch { name, from } => {
            let mut p = Progress::new();
            let r = c.call_with_progress(&Request::TemplateFetch { name, from }, &mut |m, d, t| p.update(m, d, t));
            p.finish();
            match r? {
                Response::Template(t) if g.json => output::json(&t),
                Response::Template(t) => println!(
                    "template {} here: {} files, {}, id {} (verified)",
                    t.name,
                    t.files,
                    format_size(t.bytes),
                    t.id
                ),
                r => bail!("unexpected reply {r:?}"),
            }
        }
    }
    Ok(0)
}

fn limits(a: &SpecArgs) -> Result<Limits> {
    Ok(Limits {
        memory_max: a.memory.as_deref().map(parse_size).transpose()?,
        memory_low: a.memory_low.as_deref().map(parse_size).transpose()?,
        cpus: a.cpus,
        cpu_weight: a.cpu_weight,
        pids_max: a.pids,
        disk: a.disk.as_deref().map(parse_size).transpose()?,
        inodes: a.inodes,
        history: a
            .history
            .as_deref()
            .map(vessel_types::time::parse_duration_secs)
            .transpose()
            .map_err(anyhow::Error::msg)?,
    })
}

fn ssh_keys(files: &[std::path::PathBuf]) -> Result<Vec<String>> {
    let mut keys = Vec::new();
    for f in files {
        let t = std::fs::read_to_string(f).with_context(|| format!("read SSH key file {}", f.display()))?;
        keys.extend(
            t.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(str::to_string),
        );
    }
    Ok(keys)
}

fn print_ve(g: &Global, v: &VeInfo, verb: &str) {
    if g.json {
        output::json(v);
    } else {
        let ip = v.spec.ip.map(|i| i.to_string()).unwrap_or_default();
        println!(
            "VE {} {verb}: {}, {ip}, template {}",
            v.spec.name,
            v.status.as_str(),
            v.spec.template
        );
    }
}

fn expect_ve(r: Response) -> Result<VeInfo> {
    match r {
        Response::Ve(v) => Ok(*v),
        r => bail!("unexpected reply {r:?}"),
    }
}

fn ve(g: &Global, cmd: VeCmd) -> Result<i32> {
    let c = connect(g)?;
    match cmd {
        VeCmd::Create {
            name,
            template,
            ip,
            start,
            node,
            labels,
            spec,
        } => {
            let mut place = vessel_types::api::PlaceRules {
                node,
                ..Default::default()
            };
            for l in labels {
                let Some((k, v)) = l.split_once('=') else {
                    bail!("--label {l}: give it as KEY=VALUE");
                };
                place.labels.insert(k.to_string(), v.to_string());
            }
            let mut s = VeSpec::new(name, template);
            s.limits = limits(&spec)?;
            s.hostname = spec.hostname;
            s.ip = ip;
            s.root_password_hash = spec.root_password_hash;
            s.ssh_keys = ssh_keys(&spec.ssh_key)?;
            s.env = spec.env;
            s.dns = spec.dns;
            s.replicas = spec.replicas;
            s.min_replicas = spec.min_replicas;
            if let Some(r) = spec.restart {
                s.restart = r;
            }
            let v = expect_ve(c.call(&Request::VeCreate { spec: s, start, place })?)?;
            print_ve(g, &v, "created");
        }
        VeCmd::List => match c.call(&Request::VeList)? {
            Response::Ves { ves } if g.json => output::json(&ves),
            Response::Ves { ves } => {
                let rows: Vec<Vec<String>> = ves
                    .iter()
                    .map(|v| {
                        let mem = match (v.memory_used, v.spec.limits.memory_max) {
                            (Some(u), Some(m)) => format!("{}/{}", format_size(u), format_size(m)),
                            (Some(u), None) => format_size(u),
                            (None, Some(m)) => format!("-/{}", format_size(m)),
                            (None, None) => "-".into(),
                        };
                        vec![
                            v.spec.name.to_string(),
                            v.status.as_str().to_string(),
                            v.spec.template.to_string(),
                            v.spec.ip.map(|i| i.addr.to_string()).unwrap_or_default(),
                            v.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
                            mem,
                            v.started_unix
                                .filter(|_| v.pid.is_some())
                                .map(output::ago)
                                .unwrap_or_else(|| "-".into()),
                            if v.node.is_empty() { "-".into() } else { v.node.clone() },
                        ]
                    })
                    .collect();
                output::table(
                    &["NAME", "STATUS", "TEMPLATE", "IP", "PID", "MEMORY", "STARTED", "NODE"],
                    &rows,
                );
            }
            r => bail!("unexpected reply {r:?}"),
        },
        VeCmd::Show { name } => {
            let v = expect_ve(c.call(&Request::VeShow { name })?)?;
            if g.json {
                output::json(&v);
            } else {
                show_ve(&v);
            }
        }
        VeCmd::Start { name } => print_ve(g, &expect_ve(c.call(&Request::VeStart { name })?)?, "started"),
        VeCmd::Stop { name, timeout } => print_ve(
            g,
            &expect_ve(c.call(&Request::VeStop {
                name,
                timeout_secs: timeout,
            })?)?,
            "stopped",
        ),
        VeCmd::Restart { name, timeout } => print_ve(
            g,
            &expect_ve(c.call(&Request::VeRestart {
                name,
                timeout_secs: timeout,
            })?)?,
            "restarted",
        ),
        VeCmd::Destroy { name, force } => {
            c.call(&Request::VeDestroy {
                name: name.clone(),
                force,
            })?;
            if g.json {
                output::json(&serde_json::json!({"destroyed": name}));
            } else {
                println!("VE {name} destroyed");
            }
        }
        VeCmd::Set { name, spec } => {
            let change = VeChange {
                limits: limits(&spec)?,
                hostname: spec.hostname,
                root_password_hash: spec.root_password_hash,
                ssh_keys: if spec.ssh_key.is_empty() {
                    None
                } else {
                    Some(ssh_keys(&spec.ssh_key)?)
                },
                env: if spec.env.is_empty() { None } else { Some(spec.env) },
                restart: spec.restart,
                dns: if spec.dns.is_empty() { None } else { Some(spec.dns) },
                replicas: spec.replicas,
                min_replicas: spec.min_replicas,
            };
            if change == VeChange::default() {
                bail!("nothing to change: give at least one option, e.g. --memory 512M (see `vessel ve set --help`)");
            }
            let v = expect_ve(c.call(&Request::VeSet { name, change })?)?;
            print_ve(g, &v, "updated");
            if v.restart_pending && !g.json {
                println!(
                    "some changes apply at the next start: `vessel ve restart {}`",
                    v.spec.name
                );
            }
        }
        VeCmd::Exec {
            name,
            tty,
            env,
            cwd,
            command,
        } => return exec(&c, name, tty, env, cwd, command),
        VeCmd::Console { name } => {
            c.send(&Request::VeConsole { name: name.clone() }, &[])?;
            let stream = match c.recv()? {
                (Response::ConsoleAttached, fds) => fds.into_iter().next().context("the daemon sent no console")?,
                (r, _) => bail!("unexpected reply {r:?}"),
            };
            eprintln!("connected to the console of VE {name}; Ctrl-] detaches\r");
            let _raw = crate::term::RawMode::enter();
            crate::term::relay(stream.as_fd(), stream.as_fd(), Some(0x1d));
            drop(_raw);
            eprintln!("\r\ndetached from VE {name}");
        }
        VeCmd::Logs { name, tail, raw } => {
            let req = Request::VeLogs {
                name,
                tail_bytes: tail,
                raw: !g.json,
            };
            match c.call(&req)? {
                Response::Logs { text } => output::json(&serde_json::json!({"text": text})),
                Response::LogBytes { data } => {
                    let mut out = std::io::stdout().lock();
                    if raw {
                        out.write_all(&data)?;
                    } else {
                        out.write_all(output::escape_log(&data).as_bytes())?;
                    }
                    out.flush()?;
                }
                r => bail!("unexpected reply {r:?}"),
            }
        }
        VeCmd::Diff { name, path } => match c.call(&Request::VeDiff { name, path })? {
            Response::Diff { entries } if g.json => output::json(&entries),
            Response::Diff { entries } => {
                let rows: Vec<Vec<String>> = entries
                    .iter()
                    .map(|e| vec![e.change.clone(), e.kind.clone(), format_size(e.size), e.path.clone()])
                    .collect();
                output::table(&["CHANGE", "KIND", "SIZE", "PATH"], &rows);
            }
            r => bail!("unexpected reply {r:?}"),
        },
        VeCmd::History { name, path } => match c.call(&Request::VeHistory { name, path })? {
            Response::History { entries } if g.json => output::json(&entries),
            Response::History { entries } => {
                let rows: Vec<Vec<String>> = entries
                    .iter()
                    .map(|e| {
                        vec![
                            vessel_types::time::format_utc(e.time_ns),
                            e.seq.to_string(),
                            e.path.clone(),
                            e.what.clone(),
                        ]
                    })
                    .collect();
                output::table(&["TIME (UTC)", "SEQ", "PATH", "CHANGE"], &rows);
            }
            r => bail!("unexpected reply {r:?}"),
        },
        VeCmd::Scrub { name, repair } => match c.call(&Request::VeScrub {
            name: name.clone(),
            repair,
        })? {
            Response::Scrubbed { copies } => {
                if g.json {
                    output::json(&copies);
                } else {
                    let rows: Vec<Vec<String>> = copies
                        .iter()
                        .enumerate()
                        .map(|(i, c)| {
                            let verdict = match (&c.error, c.differences.len(), i) {
                                (Some(e), _, _) => format!("not compared: {e}"),
                                (None, _, 0) => "writer".to_string(),
                                (None, 0, _) => "same".to_string(),
                                (None, n, _) => format!("{n} differences"),
                            };
                            vec![c.node.clone(), c.seq.to_string(), c.root.chars().take(16).collect(), verdict]
                        })
                        .collect();
                    output::table(&["NODE", "SEQ", "ROOT", "COPY"], &rows);
                    for c in copies.iter().filter(|c| !c.differences.is_empty()) {
                        println!("{}:", output::escape(&c.node));
                        for d in &c.differences {
                            println!("  {}", output::escape(d));
                        }
                    }
                }
                let bad: Vec<&str> = copies
                    .iter()
                    .filter(|c| !c.differences.is_empty() || c.error.is_some())
                    .map(|c| c.node.as_str())
                    .collect();
                if !bad.is_empty() && repair {
                    eprintln!(
                        "VE {name}: dropped the copies on {}; new copies are made from the writer's \
                         (watch `vessel ve show {name}`)",
                        bad.join(", ")
                    );
                } else if !bad.is_empty() {
                    bail!(
                        "VE {name}: the copies on {} differ from the writer's or could not be compared; \
                         `vessel ve scrub {name} --repair` replaces them",
                        bad.join(", ")
                    );
                }
            }
            r => bail!("unexpected reply {r:?}"),
        },
        VeCmd::Revert {
            name,
            path,
            to,
            template,
        } => {
            let to = repair_point(to.as_deref(), template)?;
            let r = c.call(&Request::VeRevert {
                name: name.clone(),
                path: path.clone(),
                to,
            })?;
            print_reverted(g, &r, &format!("{path} in VE {name}"))?;
        }
        VeCmd::Rollback { name, to } => {
            let to = repair_point(Some(&to), false)?;
            eprintln!("rolling back VE {name} (it is stopped for this and started again if it ran) ...");
            let r = c.call(&Request::VeRollback { name: name.clone(), to })?;
            print_reverted(g, &r, &format!("VE {name}"))?;
        }
        VeCmd::Export { name } => {
            if std::io::IsTerminal::is_terminal(&std::io::stdout()) {
                bail!("the export is a tar stream: redirect it to a file, e.g. `vessel ve export {name} > {name}.tar`");
            }
            c.send(&Request::VeExport { name: name.clone() }, &[1])?;
            match c.recv()?.0 {
                Response::Ok => eprintln!("exported VE {name}"),
                Response::Error(e) => return Err(e.into()),
                r => bail!("unexpected reply {r:?}"),
            }
        }
        VeCmd::Import { name, start } => {
            if std::io::IsTerminal::is_terminal(&std::io::stdin()) {
                bail!("feed an export on stdin, e.g. `vessel ve import < web.tar`");
            }
            c.send(&Request::VeImport { name, start }, &[0])?;
            match c.recv()?.0 {
                Response::Ve(v) if g.json => output::json(&v),
                Response::Ve(v) => println!(
                    "imported VE {} ({}, ip {})",
                    v.spec.name,
                    v.status.as_str(),
                    v.spec.ip.map(|i| i.to_string()).unwrap_or_default()
                ),
                Response::Error(e) => return Err(e.into()),
                r => bail!("unexpected reply {r:?}"),
            }
        }
        VeCmd::Rescue { name, end } => match c.call(&Request::VeRescue { name: name.clone(), end })? {
            Response::Ve(v) if g.json => output::json(&v),
            Response::Ve(_) if end => println!("VE {name} boots normally again"),
            Response::Ve(_) => println!(
                "VE {name} runs in rescue mode: pristine template root, its own files at /mnt/ve \
                 (`vessel ve console {name}` or `vessel ve exec {name} -- sh`; `vessel ve rescue --end {name}` returns to normal)"
            ),
            r => bail!("unexpected reply {r:?}"),
        },
        VeCmd::Move { name, to } => {
            let mut p = Progress::new();
            let r = c.call_with_progress(&Request::VeMove { name, to }, &mut |m, d, t| p.update(m, d, t));
            p.finish();
            print_ve(g, &expect_ve(r?)?, "moved")
        }
    }
    Ok(0)
}

fn repair_point(to: Option<&str>, template: bool) -> Result<vessel_types::api::RepairPoint> {
    use vessel_types::api::RepairPoint;
    if template {
        return Ok(RepairPoint::Template);
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0);
    let ns = vessel_types::time::parse_point(to.unwrap_or_default(), now).map_err(anyhow::Error::msg)?;
    Ok(RepairPoint::Time { ns })
}

fn print_reverted(g: &Global, r: &Response, what: &str) -> Result<()> {
    let what = output::escape(what);
    match r {
        Response::Reverted { changed } if g.json => output::json(&serde_json::json!({ "changed": changed })),
        Response::Reverted { changed } if changed.is_empty() => println!("{what}: nothing to change"),
        Response::Reverted { changed } => {
            for p in changed {
                println!("restored {}", output::escape(p));
            }
            println!("{what}: {} paths restored", changed.len());
        }
        r => bail!("unexpected reply {r:?}"),
    }
    Ok(())
}

fn show_ve(v: &VeInfo) {
    let l = &v.spec.limits;
    let opt = |o: Option<u64>| o.map(format_size).unwrap_or_else(|| "unlimited".into());
    println!("name:        {}", v.spec.name);
    println!(
        "status:      {}{}",
        v.status.as_str(),
        v.pid.map(|p| format!(" (init pid {p})")).unwrap_or_default()
    );
    if !v.node.is_empty() {
        println!("node:        {}", output::escape(&v.node));
    }
    if let Some(p) = &v.pending {
        println!("pending:     {}", output::escape(p));
    }
    println!(
        "template:    {} ({})",
        v.spec.template,
        output::escape(&v.template_id.chars().take(12).collect::<String>())
    );
    println!("hostname:    {}", output::escape(v.spec.hostname()));
    println!(
        "ip:          {} (host side {})",
        v.spec.ip.map(|i| i.to_string()).unwrap_or_default(),
        output::escape(&v.host_interface)
    );
    if !v.mac.is_empty() {
        println!("mac:         {}", v.mac);
    }
    println!(
        "uids:        VE 0..{} = host {}..{}",
        v.uid_count - 1,
        v.uid_base,
        v.uid_base + (v.uid_count - 1)
    );
    println!(
        "memory:      max {}, low {}, used {}",
        opt(l.memory_max),
        opt(l.memory_low),
        v.memory_used.map(format_size).unwrap_or_else(|| "-".into())
    );
    println!(
        "cpu:         {} cpus, weight {}",
        l.cpus.map(|c| c.to_string()).unwrap_or_else(|| "unlimited".into()),
        l.cpu_weight.unwrap_or(100)
    );
    println!(
        "pids:        {}",
        l.pids_max.map(|p| p.to_string()).unwrap_or_else(|| "unlimited".into())
    );
    println!(
        "disk:        quota {}, inodes {}",
        opt(l.disk),
        l.inodes.map(|p| p.to_string()).unwrap_or_else(|| "unlimited".into())
    );
    if let Some(f) = &v.fs {
        println!(
            "files:       {} in {} inodes (own files; template shared)",
            format_size(f.used_bytes),
            f.used_inodes
        );
        println!(
            "history:     kept {}; {} of log, {} changes, back to {}",
            vessel_types::time::format_duration_secs(l.history.unwrap_or(86400)),
            format_size(f.log_bytes),
            f.last_seq,
            f.oldest_ns
                .map(vessel_types::time::format_utc)
                .unwrap_or_else(|| "the template (no changes yet)".into())
        );
    }
    if let Some(n) = v.spec.replicas.filter(|n| *n > 1) {
        let min = v.spec.min_replicas_of(n);
        println!("copies:      {n} wanted, {min} needed in sync for a sync to return");
        // The writer's own copy is always in sync.
        let in_sync = 1 + v.replicas.iter().filter(|r| r.in_sync).count();
        if v.status == vessel_types::VeStatus::Running && in_sync < usize::from(min) {
            println!(
                "syncs:       WAITING: {in_sync} of the {min} copies a sync needs are in sync; \
                 fsync in the VE waits, then fails with EIO (see the replicas below)"
            );
        }
    }
    if !v.replicas.is_empty() {
        let rows: Vec<Vec<String>> = v
            .replicas
            .iter()
            .map(|r| {
                vec![
                    r.node.clone(),
                    if r.in_sync { "yes".into() } else { "no".into() },
                    r.state.clone(),
                    r.durable_seq.to_string(),
                    r.lag_txs.to_string(),
                    format_size(r.lag_bytes),
                ]
            })
            .collect();
        println!("replicas:");
        output::table(&["NODE", "IN-SYNC", "STATE", "DURABLE SEQ", "LAG TXS", "LAG"], &rows);
    }
    if let Some(r) = &v.last_scrub {
        println!(
            "last scrub:  {} ({}): {}",
            output::ago(r.at_unix),
            if r.scheduled { "scheduled" } else { "by hand" },
            output::escape(&r.verdict())
        );
    }
    if v.rescue {
        println!("rescue:      yes (pristine template root; own files at /mnt/ve)");
    }
    println!("restart:     {:?}", v.spec.restart);
    println!("created:     {}", output::ago(v.created_unix));
    if let Some(s) = v.started_unix {
        println!("started:     {}", output::ago(s));
    }
    if let Some(c) = v.last_exit {
        println!("last exit:   {c}");
    }
    if let Some(e) = &v.last_error {
        println!("last error:  {}", output::escape(e));
    }
    if v.restart_pending {
        println!("note:        settings changed; they apply at the next restart");
    }
    if v.console_lost {
        println!("note:        console lost when the daemon restarted; `vessel ve restart` restores it");
    }
}

fn exec(
    c: &Client,
    name: vessel_types::Name,
    tty: bool,
    env: Vec<String>,
    cwd: Option<String>,
    argv: Vec<String>,
) -> Result<i32> {
    let req = Request::VeExec {
        name,
        argv,
        tty,
        env,
        cwd,
    };
    if !tty {
        c.send(&req, &[0, 1, 2])?;
    } else {
        c.send(&req, &[])?;
    }
    let (r, fds) = c.recv()?;
    if !matches!(r, Response::ExecStarted) {
        bail!("unexpected reply {r:?}");
    }
    if tty {
        let master = fds.into_iter().next().context("the daemon sent no terminal")?;
        crate::term::copy_winsize(master.as_raw_fd());
        let raw = crate::term::RawMode::enter();
        crate::term::relay(master.as_fd(), master.as_fd(), None);
        drop(raw);
    }
    match c.recv()?.0 {
        Response::Exit { code } => Ok(code),
        r => bail!("unexpected reply {r:?}"),
    }
}
