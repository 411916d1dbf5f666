//! VE networking on one node: a Linux bridge holding the gateway address, and per VE a
//! veth pair whose inside end is `eth0` in the VE's own network namespace. Configuration
//! goes through iproute2's `ip -batch` (one process per namespace side).

use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use vessel_types::Ipv4Cidr;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("ip {context}: {message}")]
    Ip { context: String, message: String },
}

type Result<T> = std::result::Result<T, NetError>;

fn ip_batch(context: &str, script: &str, netns_pid: Option<i32>) -> Result<()> {
    let err = |m: String| NetError::Ip {
        context: context.to_string(),
        message: m,
    };
    let mut cmd = Command::new("ip");
    cmd.args(["-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if let Some(pid) = netns_pid {
        let ns = std::fs::File::open(format!("/proc/{pid}/ns/net"))
            .map_err(|e| err(format!("open netns of pid {pid}: {e}")))?;
        // SAFETY: the closure runs in the forked child before exec and only calls setns(2).
        unsafe {
            cmd.pre_exec(move || {
                nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)
            });
        }
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| err(format!("cannot run ip (install iproute2): {e}")))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(script.as_bytes()).map_err(|e| err(e.to_string()))?;
    }
    let out = child.wait_with_output().map_err(|e| err(e.to_string()))?;
    if !out.status.success() {
        return Err(err(String::from_utf8_lossy(&out.stderr).trim().to_string()));
    }
    Ok(())
}

/// Whether a link exists in this process's network namespace. `/proc/self/net` follows
/// the caller's namespace (`/sys/class/net` follows the namespace that mounted sysfs).
pub fn link_exists(name: &str) -> bool {
    std::fs::read_to_string("/proc/self/net/dev")
        .map(|t| {
            t.lines()
                .skip(2)
                .any(|l| l.split(':').next().map(str::trim) == Some(name))
        })
        .unwrap_or(false)
}

/// Make sure the node bridge exists, is up and holds the gateway address.
pub fn ensure_bridge(bridge: &str, gateway: Ipv4Cidr) -> Result<()> {
    if !link_exists(bridge) {
        ip_batch(
            "create bridge",
            &format!("link add {bridge} type bridge\naddr add {gateway} dev {bridge}\nlink set {bridge} up\n"),
            None,
        )?;
    }
    Ok(())
}

pub fn delete_link(name: &str) -> Result<()> {
    if link_exists(name) {
        ip_batch("delete link", &format!("link del {name}\n"), None)?;
    }
    Ok(())
}

/// Script for the host side: create the pair with `eth0` directly in the VE's namespace.
pub fn host_script(host_if: &str, bridge: &str, pid: i32) -> String {
    format!("link add {host_if} type veth peer name eth0 netns {pid}\nlink set {host_if} master {bridge} up\n")
}

/// Script for the VE side: loopback, address, default route.
pub fn ve_script(ip: Ipv4Cidr, gateway: std::net::Ipv4Addr) -> String {
    format!("link set lo up\naddr add {ip} dev eth0\nlink set eth0 up\nroute add default via {gateway}\n")
}

/// Give the VE whose init is `pid` its `eth0` on `bridge` with address `ip`.
pub fn attach_ve(host_if: &str, bridge: &str, pid: i32, ip: Ipv4Cidr, gateway: std::net::Ipv4Addr) -> Result<()> {
    let _ = delete_link(host_if); // a stale end from a crashed start
    ip_batch("create veth", &host_script(host_if, bridge, pid), None)?;
    ip_batch("configure VE network", &ve_script(ip, gateway), Some(pid)).inspect_err(|_| {
        let _ = delete_link(host_if);
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scripts() {
        assert_eq!(
            host_script("vh3", "vessel0", 42),
            "link add vh3 type veth peer name eth0 netns 42\nlink set vh3 master vessel0 up\n"
        );
        let s = ve_script(Ipv4Cidr::parse("10.9.0.2/16").unwrap(), "10.9.0.1".parse().unwrap());
        assert!(s.contains("addr add 10.9.0.2/16 dev eth0"));
        assert!(s.contains("route add default via 10.9.0.1"));
    }
}
