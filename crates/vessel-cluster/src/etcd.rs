//! A private single-member etcd: what `vessel up` runs on one machine, so that one node is
//! a cluster of one with the same control path as many. It listens on 127.0.0.1 (plain:
//! only this machine reaches it) and, once the node is in a cluster of several
//! ([`EtcdTls`]), also on the node's address with TLS and client certificates of the
//! cluster CA (other nodes connect with their node certificates). It
//! keeps its data under the node root, logs to a file beside it, is restarted by
//! [`PrivateEtcd::ensure_running`] if it dies, and dies with the thread that started it
//! (`PR_SET_PDEATHSIG`: start it from a thread that lives as long as the daemon).

use crate::ClusterError;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct EtcdConfig {
    /// Member name (the node's name).
    pub name: String,
    pub data_dir: PathBuf,
    pub client_port: u16,
    pub peer_port: u16,
    /// etcd's heartbeat interval and election timeout (ms).
    pub heartbeat_ms: u32,
    pub election_ms: u32,
    /// The etcd binary (`etcd` from PATH by default).
    pub binary: PathBuf,
    /// A second client listener for other nodes: TLS, client certificates required.
    pub tls: Option<EtcdTls>,
}

/// etcd's listener for other nodes: `https://addr:port`, the node's certificate as the
/// server's, clients must present a certificate signed by the cluster CA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdTls {
    pub addr: std::net::IpAddr,
    pub port: u16,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub ca_file: PathBuf,
    /// Revoked client certificates (read by etcd at every handshake).
    pub crl_file: Option<PathBuf>,
}

impl EtcdTls {
    pub fn url(&self) -> String {
        format!("https://{}", SocketAddr::new(self.addr, self.port))
    }
}

impl EtcdConfig {
    pub fn new(name: &str, data_dir: PathBuf, client_port: u16, peer_port: u16) -> EtcdConfig {
        EtcdConfig {
            name: name.to_string(),
            data_dir,
            client_port,
            peer_port,
            heartbeat_ms: 100,
            election_ms: 1000,
            binary: PathBuf::from("etcd"),
            tls: None,
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    /// etcd's command line. Pure.
    pub fn args(&self) -> Vec<String> {
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let mut client = self.endpoint();
        let mut tls = Vec::new();
        if let Some(t) = &self.tls {
            // `--client-cert-auth` applies to the https listener; the plain one is 127.0.0.1.
            client = format!("{client},{}", t.url());
            tls = vec![
                format!("--cert-file={}", t.cert_file.display()),
                format!("--key-file={}", t.key_file.display()),
                format!("--trusted-ca-file={}", t.ca_file.display()),
                "--client-cert-auth".into(),
            ];
            if let Some(crl) = &t.crl_file {
                tls.push(format!("--client-crl-file={}", crl.display()));
            }
        }
        let mut args = vec![
            format!("--name={}", self.name),
            format!("--data-dir={}", self.data_dir.display()),
            format!("--listen-client-urls={client}"),
            format!("--advertise-client-urls={client}"),
            format!("--listen-peer-urls={peer}"),
            format!("--initial-advertise-peer-urls={peer}"),
            format!("--initial-cluster={}={peer}", self.name),
            "--initial-cluster-state=new".into(),
            format!("--heartbeat-interval={}", self.heartbeat_ms),
            format!("--election-timeout={}", self.election_ms),
            "--logger=zap".into(),
            "--log-outputs=stderr".into(),
        ];
        args.extend(tls);
        args
    }
}

/// How long a start waits for etcd to answer.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

pub struct PrivateEtcd {
    cfg: EtcdConfig,
    child: Option<Child>,
    pub restarts: u32,
}

impl PrivateEtcd {
    /// Start etcd and wait until it answers its health check.
    pub fn start(cfg: EtcdConfig) -> Result<PrivateEtcd, ClusterError> {
        let mut e = PrivateEtcd {
            cfg,
            child: None,
            restarts: 0,
        };
        e.spawn()?;
        Ok(e)
    }

    pub fn endpoint(&self) -> String {
        self.cfg.endpoint()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    fn log_path(&self) -> PathBuf {
        self.cfg.data_dir.with_extension("log")
    }

    fn spawn(&mut self) -> Result<(), ClusterError> {
        std::fs::create_dir_all(&self.cfg.data_dir)?;
        std::fs::set_permissions(&self.cfg.data_dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())?;
        let mut cmd = Command::new(&self.cfg.binary);
        // SAFETY: prctl is async-signal-safe; the closure touches no memory of the parent.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                // If the node daemon dies (even by SIGKILL), its private etcd goes too:
                // the next daemon starts its own on the same data.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .args(self.cfg.args())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .map_err(|e| {
                ClusterError::Start(format!(
                    "running {}: {e}; install it (Debian: apt-get install etcd-server) or point the node at an etcd cluster with --etcd URL,...",
                    self.cfg.binary.display()
                ))
            })?;
        self.child = Some(child);
        let t0 = Instant::now();
        loop {
            if healthy(self.cfg.client_port) {
                return Ok(());
            }
            if let Some(Ok(Some(st))) = self.child.as_mut().map(|c| c.try_wait()) {
                self.child = None;
                return Err(ClusterError::Start(format!(
                    "etcd exited ({st}) before it answered; see {}",
                    self.log_path().display()
                )));
            }
            if t0.elapsed() > READY_TIMEOUT {
                self.stop();
                return Err(ClusterError::Start(format!(
                    "etcd did not answer on 127.0.0.1:{} within {} s; see {}",
                    self.cfg.client_port,
                    READY_TIMEOUT.as_secs(),
                    self.log_path().display()
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stop etcd and keep `cfg` (same data) for its next start by [`Self::ensure_running`],
    /// which the supervising thread calls: etcd dies with the thread that started it, so a
    /// short-lived thread must not start it. E.g. its listener for other nodes once the
    /// node is in a cluster of several.
    pub fn replace_config(&mut self, cfg: EtcdConfig) {
        self.stop();
        self.cfg = cfg;
    }

    pub fn config(&self) -> &EtcdConfig {
        &self.cfg
    }

    /// Restart etcd if it died; returns whether it had to.
    pub fn ensure_running(&mut self) -> Result<bool, ClusterError> {
        let alive = match self.child.as_mut().map(|c| c.try_wait()) {
            Some(Ok(None)) => true,
            Some(Ok(Some(_))) | Some(Err(_)) | None => false,
        };
        if alive {
            return Ok(false);
        }
        self.child = None;
        self.restarts += 1;
        self.spawn()?;
        Ok(true)
    }

    /// Stop etcd: SIGTERM, then SIGKILL after 10 s.
    pub fn stop(&mut self) {
        let Some(mut c) = self.child.take() else { return };
        let pid = nix::unistd::Pid::from_raw(c.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(_)) = c.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = c.kill();
        let _ = c.wait();
    }
}

impl Drop for PrivateEtcd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// etcd's `/health` on 127.0.0.1:`port` says `"health":"true"`.
pub fn healthy(port: u16) -> bool {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").is_err() {
        return false;
    }
    let mut body = Vec::new();
    let _ = s.take(64 << 10).read_to_end(&mut body);
    String::from_utf8_lossy(&body).contains("\"health\":\"true\"")
}

/// A port on 127.0.0.1 that nothing listens on now (for tests and labs).
pub fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
        .local_addr()?
        .port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_listener_for_other_nodes_requires_client_certificates() {
        let mut c = EtcdConfig::new("a", "/d".into(), 1, 2);
        let plain = c.args();
        assert!(
            plain.contains(&"--listen-client-urls=http://127.0.0.1:1".to_string()),
            "{plain:?}"
        );
        assert!(!plain.iter().any(|a| a.contains("cert")), "{plain:?}");
        c.tls = Some(EtcdTls {
            addr: "10.0.0.5".parse().unwrap(),
            port: 3,
            cert_file: "/c/node.crt".into(),
            key_file: "/c/node.key".into(),
            ca_file: "/c/ca.crt".into(),
            crl_file: Some("/c/crl.pem".into()),
        });
        let a = c.args();
        for want in [
            "--listen-client-urls=http://127.0.0.1:1,https://10.0.0.5:3",
            "--client-crl-file=/c/crl.pem",
            "--advertise-client-urls=http://127.0.0.1:1,https://10.0.0.5:3",
            "--cert-file=/c/node.crt",
            "--key-file=/c/node.key",
            "--trusted-ca-file=/c/ca.crt",
            "--client-cert-auth",
        ] {
            assert!(a.contains(&want.to_string()), "{want} not in {a:?}");
        }
    }
}
