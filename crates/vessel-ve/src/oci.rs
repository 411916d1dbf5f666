//! Render the OCI runtime spec (`config.json`) that libcontainer runs a VE from. Pure: the
//! same inputs give the same document, checked by unit tests against `oci-spec`'s types.

use serde_json::{json, Value};
use std::path::Path;
use vessel_types::{Limits, VeSpec};

/// Capabilities a VE's root keeps. They act only on what the VE's user namespace owns,
/// so a VE can run a whole server (bind low ports, manage its firewall, chroot, reboot
/// itself) while module loading, raw I/O, the clock and audit stay the host's.
pub const VE_CAPS: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_SETFCAP",
];

/// System calls a VE may never make, whatever its capabilities: kernel modules and kexec,
/// swap, accounting, the kernel keyring, BPF and perf (kernel attack surface), handle-based
/// opens (escape from bind mounts), and the clock.
pub const DENIED_SYSCALLS: &[&str] = &[
    "acct",
    "add_key",
    "bpf",
    "clock_adjtime",
    "clock_settime",
    "create_module",
    "delete_module",
    "finit_module",
    "get_kernel_syms",
    "init_module",
    "ioperm",
    "iopl",
    "kcmp",
    "kexec_file_load",
    "kexec_load",
    "keyctl",
    "lookup_dcookie",
    "nfsservctl",
    "open_by_handle_at",
    "perf_event_open",
    "query_module",
    "quotactl",
    "request_key",
    "settimeofday",
    "stime",
    "swapoff",
    "swapon",
    "syslog",
    "uselib",
    "userfaultfd",
    "vm86",
    "vm86old",
    "_sysctl",
    "adjtimex",
];

/// Inputs for one VE's runtime spec.
pub struct SpecInput<'a> {
    pub spec: &'a VeSpec,
    pub rootfs: &'a Path,
    pub init: &'a [String],
    pub uid_base: u32,
    pub uid_count: u32,
    pub cgroup_path: &'a str,
    /// Extra bind mounts: (host path, path in the VE).
    pub binds: &'a [(std::path::PathBuf, String)],
}

fn resources(l: &Limits) -> Value {
    let mut r = json!({
        "devices": [
            {"allow": false, "access": "rwm"},
            {"allow": true, "type": "c", "major": 1, "minor": 3, "access": "rwm"},
            {"allow": true, "type": "c", "major": 1, "minor": 5, "access": "rwm"},
            {"allow": true, "type": "c", "major": 1, "minor": 7, "access": "rwm"},
            {"allow": true, "type": "c", "major": 1, "minor": 8, "access": "rwm"},
            {"allow": true, "type": "c", "major": 1, "minor": 9, "access": "rwm"},
            {"allow": true, "type": "c", "major": 5, "minor": 0, "access": "rwm"},
            {"allow": true, "type": "c", "major": 5, "minor": 1, "access": "rwm"},
            {"allow": true, "type": "c", "major": 5, "minor": 2, "access": "rwm"},
            {"allow": true, "type": "c", "major": 136, "access": "rwm"},
            {"allow": true, "type": "c", "major": 10, "minor": 200, "access": "rwm"}
        ]
    });
    let mut mem = serde_json::Map::new();
    if let Some(m) = l.memory_max {
        mem.insert("limit".into(), json!(m));
    }
    if let Some(m) = l.memory_low {
        mem.insert("reservation".into(), json!(m));
    }
    if !mem.is_empty() {
        r["memory"] = Value::Object(mem);
    }
    let mut cpu = serde_json::Map::new();
    if let Some(q) = l.cpu_quota_us() {
        cpu.insert("quota".into(), json!(q));
        cpu.insert("period".into(), json!(vessel_types::limits::CPU_PERIOD_US));
    }
    if let Some(s) = l.cpu_shares() {
        cpu.insert("shares".into(), json!(s));
    }
    if !cpu.is_empty() {
        r["cpu"] = Value::Object(cpu);
    }
    if let Some(p) = l.pids_max {
        r["pids"] = json!({"limit": p});
    }
    r
}

pub fn render(input: &SpecInput) -> Value {
    let s = input.spec;
    let mut env = vec![
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string(),
        "TERM=vt100".to_string(),
        "container=vessel".to_string(),
    ];
    env.extend(s.env.iter().cloned());
    let caps: Vec<&str> = VE_CAPS.to_vec();
    let mut mounts = json!([
        {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
        {"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
        {"destination": "/run", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev", "mode=755", "size=65536k"]}
    ]);
    if let Some(m) = mounts.as_array_mut() {
        for (src, dst) in input.binds {
            m.push(json!({"destination": dst, "type": "bind", "source": src, "options": ["rbind", "rw"]}));
        }
    }
    json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": true,
            "user": {"uid": 0, "gid": 0},
            "args": input.init,
            "env": env,
            "cwd": "/",
            "capabilities": {
                "bounding": caps, "effective": caps, "permitted": caps,
                "inheritable": [], "ambient": []
            },
            "noNewPrivileges": false
        },
        "root": {"path": input.rootfs, "readonly": false},
        "hostname": s.hostname(),
        "mounts": mounts,
        "linux": {
            "uidMappings": [{"containerID": 0, "hostID": input.uid_base, "size": input.uid_count}],
            "gidMappings": [{"containerID": 0, "hostID": input.uid_base, "size": input.uid_count}],
            "namespaces": [
                {"type": "pid"}, {"type": "network"}, {"type": "ipc"}, {"type": "uts"},
                {"type": "mount"}, {"type": "user"}, {"type": "cgroup"}
            ],
            "cgroupsPath": input.cgroup_path,
            "resources": resources(&s.limits),
            "maskedPaths": [
                "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
                "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi",
                "/sys/firmware", "/sys/devices/virtual/powercap"
            ],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sysrq-trigger"],
            "seccomp": {
                "defaultAction": "SCMP_ACT_ALLOW",
                "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
                "syscalls": [{"names": DENIED_SYSCALLS, "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vessel_types::Name;

    #[test]
    fn spec_parses_as_oci_and_carries_limits() {
        let mut spec = VeSpec::new(Name::parse("web").unwrap(), Name::parse("busybox").unwrap());
        spec.limits = Limits {
            memory_max: Some(256 << 20),
            cpus: Some(0.5),
            pids_max: Some(100),
            ..Default::default()
        };
        spec.env = vec!["A=b".into()];
        let init = vec!["/sbin/init".to_string()];
        let v = render(&SpecInput {
            spec: &spec,
            rootfs: Path::new("/r"),
            init: &init,
            uid_base: 200_000,
            uid_count: 65536,
            cgroup_path: "/vessel/web",
            binds: &[],
        });
        let oci: oci_spec::runtime::Spec = serde_json::from_value(v.clone()).expect("valid OCI spec");
        let linux = oci.linux().as_ref().unwrap();
        assert_eq!(linux.uid_mappings().as_ref().unwrap()[0].host_id(), 200_000);
        let res = linux.resources().as_ref().unwrap();
        assert_eq!(res.memory().as_ref().unwrap().limit(), Some(256 << 20));
        assert_eq!(res.cpu().as_ref().unwrap().quota(), Some(50_000));
        assert_eq!(res.pids().as_ref().unwrap().limit(), 100);
        assert_eq!(oci.hostname().as_deref(), Some("web"));
        let env = oci.process().as_ref().unwrap().env().as_ref().unwrap();
        assert!(env.contains(&"A=b".to_string()));
        assert!(v["linux"]["seccomp"]["syscalls"][0]["names"]
            .as_array()
            .unwrap()
            .contains(&json!("kexec_load")));
    }
}
