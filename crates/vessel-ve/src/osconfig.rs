//! OS parameters of a VE written into its own tree: hostname, hosts, DNS, root password,
//! SSH keys; and the system files of the built-in templates. Rendering is pure (tested
//! without root); writing goes through [`crate::sys::open_in_root`], so every path is
//! resolved inside the VE's tree as if it were `/`: a VE that replaced `/etc/hostname` with
//! a symlink to `/../../etc/shadow` gets its own `/etc/shadow` written, never the host's.
//!
//! The VE owns these files and may have replaced them with anything. A symlink is followed
//! inside the VE (as `echo > /etc/resolv.conf` would, so a resolvconf-style link keeps
//! working); anything that is not a regular file (FIFO, socket, device node) is replaced by a
//! fresh file with an atomic rename, never opened for writing, so the daemon cannot block on
//! it; a directory in the way is a clear error. Reads are bounded ([`MAX_READ`]).

use crate::sys::open_in_root;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use vessel_types::VeSpec;

/// (path, content, mode) of the files a busybox template needs beyond the binary.
pub fn busybox_files() -> Vec<(&'static str, &'static str, u32)> {
    vec![
        ("etc/passwd", "root:x:0:0:root:/root:/bin/sh\ndaemon:x:1:1:daemon:/usr/sbin:/bin/false\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n", 0o644),
        ("etc/group", "root:x:0:\ndaemon:x:1:\ntty:x:5:\nnogroup:x:65534:\n", 0o644),
        ("etc/shadow", "root:*:19000:0:99999:7:::\ndaemon:*:19000:0:99999:7:::\nnobody:*:19000:0:99999:7:::\n", 0o600),
        ("etc/hostname", "localhost\n", 0o644),
        ("etc/hosts", "127.0.0.1\tlocalhost\n", 0o644),
        ("etc/resolv.conf", "", 0o644),
        ("etc/profile", "export PATH=/usr/sbin:/usr/bin:/sbin:/bin\nexport PS1='\\u@\\h:\\w\\$ '\n", 0o644),
        ("etc/inittab", BUSYBOX_INITTAB, 0o644),
        ("etc/init.d/rcS", BUSYBOX_RCS, 0o755),
        ("etc/init.d/rcK", BUSYBOX_RCK, 0o755),
        ("etc/init.d/console", CONSOLE_GETTY, 0o755),
    ]
}

const BUSYBOX_INITTAB: &str = "\
# Vessel busybox VE: boot scripts, a login on the console, clean shutdown.
::sysinit:/etc/init.d/rcS
::respawn:/etc/init.d/console
::ctrlaltdel:/sbin/reboot
::shutdown:/etc/init.d/rcK
";

const BUSYBOX_RCS: &str = "\
#!/bin/sh
# Start the VE's services: every executable /etc/rc.d/S* script, in order.
mkdir -p /run /var/run /tmp
for s in /etc/rc.d/S*; do [ -x \"$s\" ] && \"$s\" start; done
exit 0
";

const BUSYBOX_RCK: &str = "\
#!/bin/sh
# Stop the VE's services in reverse order.
for s in $(ls -r /etc/rc.d/S* 2>/dev/null); do [ -x \"$s\" ] && \"$s\" stop; done
exit 0
";

const CONSOLE_GETTY: &str = "\
#!/bin/sh
# Login prompt on the VE console. The pause keeps a console nobody reads from spinning.
sleep 1
exec /sbin/getty -L 115200 console vt100
";

/// Files that adapt a debootstrapped Debian to run as a VE under sysvinit.
pub fn debian_files() -> Vec<(&'static str, &'static str, u32)> {
    vec![
        ("etc/inittab", DEBIAN_INITTAB, 0o644),
        ("etc/hostname", "localhost\n", 0o644),
        (
            "etc/hosts",
            "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n",
            0o644,
        ),
        // Policy for dpkg inside the VE: services start when packages are installed.
        ("usr/sbin/policy-rc.d", "#!/bin/sh\nexit 0\n", 0o755),
    ]
}

/// Boot scripts that touch hardware or the kernel and fail or hang in a container.
pub const DEBIAN_DISABLED_SERVICES: &[&str] = &[
    "hwclock.sh",
    "kmod",
    "udev",
    "procps",
    "mountall.sh",
    "mountnfs.sh",
    "checkroot.sh",
    "checkfs.sh",
    "checkroot-bootclean.sh",
    "mountdevsubfs.sh",
    "mountkernfs.sh",
    "brightness",
    "urandom",
];

const DEBIAN_INITTAB: &str = "\
# Vessel Debian VE (sysvinit). SIGPWR from the node means: shut down now.
id:2:initdefault:
si::sysinit:/etc/init.d/rcS
l0:0:wait:/etc/init.d/rc 0
l1:1:wait:/etc/init.d/rc 1
l2:2:wait:/etc/init.d/rc 2
l3:3:wait:/etc/init.d/rc 3
l4:4:wait:/etc/init.d/rc 4
l5:5:wait:/etc/init.d/rc 5
l6:6:wait:/etc/init.d/rc 6
p0::powerfail:/sbin/init 0
pn::powerfailnow:/sbin/init 0
co:2345:respawn:/sbin/agetty --noclear --keep-baud console 115200,38400,9600 vt102
";

/// `/etc/hosts` with the VE's own name on its address.
pub fn render_hosts(hostname: &str, ip: Option<std::net::Ipv4Addr>) -> String {
    let short = hostname.split('.').next().unwrap_or(hostname);
    let names = if short == hostname {
        hostname.to_string()
    } else {
        format!("{hostname} {short}")
    };
    let own = match ip {
        Some(ip) => format!("{ip}\t{names}\n"),
        None => format!("127.0.1.1\t{names}\n"),
    };
    format!("127.0.0.1\tlocalhost\n{own}::1\tlocalhost ip6-localhost ip6-loopback\n")
}

pub fn render_resolv(dns: &[String]) -> String {
    dns.iter().map(|d| format!("nameserver {d}\n")).collect()
}

/// Replace root's password hash in a shadow file, keeping every other line and field.
pub fn set_root_hash(shadow: &str, hash: &str) -> String {
    let mut found = false;
    let mut out: Vec<String> = shadow
        .lines()
        .map(|l| {
            let mut f: Vec<&str> = l.split(':').collect();
            if f.first() == Some(&"root") && f.len() >= 2 {
                found = true;
                f[1] = hash;
                f.join(":")
            } else {
                l.to_string()
            }
        })
        .collect();
    if !found {
        out.insert(0, format!("root:{hash}:19000:0:99999:7:::"));
    }
    out.join("\n") + "\n"
}

/// Write the VE's OS parameters into its mounted root tree (`rootfs`), as files owned by
/// the VE's root (host uid `uid_base`).
pub fn apply(rootfs: &Path, spec: &VeSpec, uid_base: u32) -> std::io::Result<()> {
    let root: OwnedFd = std::fs::File::open(rootfs)?.into();
    let root = &root;
    let hostname = spec.hostname();
    write_if_changed(root, "etc/hostname", &format!("{hostname}\n"), 0o644, uid_base)?;
    write_if_changed(
        root,
        "etc/hosts",
        &render_hosts(hostname, spec.ip.map(|c| c.addr)),
        0o644,
        uid_base,
    )?;
    if !spec.dns.is_empty() {
        write_if_changed(root, "etc/resolv.conf", &render_resolv(&spec.dns), 0o644, uid_base)?;
    }
    if let Some(h) = &spec.root_password_hash {
        let cur = read_in_root(root, "etc/shadow")?.unwrap_or_default();
        write_if_changed(root, "etc/shadow", &set_root_hash(&cur, h), 0o600, uid_base)?;
    }
    if !spec.ssh_keys.is_empty() {
        mkdir_in_root(root, "root/.ssh", 0o700, uid_base)?;
        let keys: String = spec.ssh_keys.iter().map(|k| format!("{k}\n")).collect();
        write_if_changed(root, "root/.ssh/authorized_keys", &keys, 0o600, uid_base)?;
    }
    Ok(())
}

/// Largest VE file the daemon reads for its settings (`/etc/shadow` of a VE with many
/// users fits easily; a VE that made it 100 GB does not make the daemon read 100 GB).
pub const MAX_READ: u64 = 4 << 20;

fn ctx(rel: &str, e: std::io::Error) -> std::io::Error {
    std::io::Error::new(e.kind(), format!("/{rel} in the VE: {e}"))
}

fn file_type(fd: &OwnedFd) -> std::io::Result<u32> {
    // SAFETY: an all-zero stat is a valid buffer for fstat to fill.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat on an fd we own into a local buffer.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(st.st_mode & libc::S_IFMT)
}

/// What the VE's file holds now; None if it is missing or not a regular file.
fn read_in_root(root: &OwnedFd, rel: &str) -> std::io::Result<Option<String>> {
    // O_NONBLOCK: a FIFO planted by the VE must not block the daemon's open.
    let fd = match open_in_root(
        root,
        Path::new(rel),
        libc::O_RDONLY | libc::O_NONBLOCK | libc::O_NOCTTY,
        0,
    ) {
        Ok(fd) => fd,
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(None),
        Err(e) => return Err(ctx(rel, e)),
    };
    if file_type(&fd).map_err(|e| ctx(rel, e))? != libc::S_IFREG {
        return Ok(None);
    }
    let mut buf = Vec::new();
    std::fs::File::from(fd)
        .take(MAX_READ + 1)
        .read_to_end(&mut buf)
        .map_err(|e| ctx(rel, e))?;
    if buf.len() as u64 > MAX_READ {
        return Err(ctx(
            rel,
            std::io::Error::new(std::io::ErrorKind::InvalidData, format!("larger than {MAX_READ} bytes")),
        ));
    }
    Ok(Some(String::from_utf8_lossy(&buf).into_owned()))
}

fn write_if_changed(root: &OwnedFd, rel: &str, content: &str, mode: u32, uid: u32) -> std::io::Result<()> {
    match read_in_root(root, rel) {
        Ok(Some(cur)) if cur == content => return Ok(()),
        _ => {}
    }
    write_in_root(root, rel, content, mode, uid).map_err(|e| ctx(rel, e))
}

fn own_and_fill(fd: OwnedFd, content: &str, mode: u32, uid: u32) -> std::io::Result<()> {
    // SAFETY: fd is a valid open file we own.
    if unsafe { libc::fchown(fd.as_raw_fd(), uid, uid) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fchmod(fd.as_raw_fd(), mode) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut f = std::fs::File::from(fd);
    f.set_len(0)?;
    f.write_all(content.as_bytes())
}

fn write_in_root(root: &OwnedFd, rel: &str, content: &str, mode: u32, uid: u32) -> std::io::Result<()> {
    // A regular file (or a symlink to one, inside the VE) is rewritten in place.
    let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_NONBLOCK | libc::O_NOCTTY;
    match open_in_root(root, Path::new(rel), flags, mode) {
        Ok(fd) if file_type(&fd)? == libc::S_IFREG => return own_and_fill(fd, content, mode, uid),
        Ok(_) => {}
        Err(e) if e.raw_os_error() == Some(libc::EISDIR) => {
            return Err(std::io::Error::other("is a directory: remove it inside the VE"))
        }
        // ENXIO: a socket or a FIFO without reader; EACCES: a device node (nodev mount).
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENXIO | libc::EACCES | libc::ELOOP)) => {}
        Err(e) => return Err(e),
    }
    // Anything else sits in the way: put a fresh file there with an atomic rename.
    let p = Path::new(rel);
    let (parent, name) = (p.parent().unwrap_or(Path::new("")), p.file_name().unwrap_or_default());
    let dir = open_in_root(root, parent, libc::O_DIRECTORY | libc::O_RDONLY, 0)?;
    let tmp = format!(".{}.vessel-tmp", name.to_string_lossy());
    let ctmp = std::ffi::CString::new(tmp).map_err(|_| std::io::Error::other("NUL in name"))?;
    let cname = std::ffi::CString::new(name.as_encoded_bytes()).map_err(|_| std::io::Error::other("NUL in name"))?;
    // SAFETY: valid dir fd and C string; a leftover temp name is replaced.
    unsafe { libc::unlinkat(dir.as_raw_fd(), ctmp.as_ptr(), 0) };
    // SAFETY: valid dir fd and C string; O_EXCL|O_NOFOLLOW create a new regular file only.
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            ctmp.as_ptr(),
            libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            mode,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: openat returned a new fd that nothing else owns.
    own_and_fill(unsafe { OwnedFd::from_raw_fd(fd) }, content, mode, uid)?;
    // SAFETY: valid dir fd and C strings, both names in that directory.
    if unsafe { libc::renameat(dir.as_raw_fd(), ctmp.as_ptr(), dir.as_raw_fd(), cname.as_ptr()) } != 0 {
        let e = std::io::Error::last_os_error();
        // SAFETY: as above.
        unsafe { libc::unlinkat(dir.as_raw_fd(), ctmp.as_ptr(), 0) };
        return Err(e);
    }
    Ok(())
}

fn mkdir_in_root(root: &OwnedFd, rel: &str, mode: u32, uid: u32) -> std::io::Result<()> {
    let p = Path::new(rel);
    let (parent, name) = (p.parent().unwrap_or(Path::new("")), p.file_name().unwrap_or_default());
    let pfd = open_in_root(root, parent, libc::O_DIRECTORY | libc::O_RDONLY, 0)?;
    let cname = std::ffi::CString::new(name.as_encoded_bytes()).map_err(|_| std::io::Error::other("NUL in name"))?;
    // SAFETY: valid dir fd and C string.
    let rc = unsafe { libc::mkdirat(pfd.as_raw_fd(), cname.as_ptr(), mode) };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::AlreadyExists {
            return Err(e);
        }
    }
    // SAFETY: valid dir fd and C string; AT_SYMLINK_NOFOLLOW keeps a symlink from redirecting the chown.
    if unsafe { libc::fchownat(pfd.as_raw_fd(), cname.as_ptr(), uid, uid, libc::AT_SYMLINK_NOFOLLOW) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_has_own_name() {
        let h = render_hosts("web.example.com", Some("10.1.0.5".parse().unwrap()));
        assert!(h.contains("10.1.0.5\tweb.example.com web\n"));
        assert!(h.starts_with("127.0.0.1\tlocalhost\n"));
        assert!(render_hosts("a", None).contains("127.0.1.1\ta\n"));
    }

    #[test]
    fn root_hash_replaced_only_for_root() {
        let s = "root:*:19000:0:99999:7:::\nbob:$1$x:19000:0:99999:7:::\n";
        let out = set_root_hash(s, "$6$s$h");
        assert_eq!(out, "root:$6$s$h:19000:0:99999:7:::\nbob:$1$x:19000:0:99999:7:::\n");
        assert!(set_root_hash("", "$6$a").starts_with("root:$6$a:"));
    }

    #[test]
    fn resolv_lists_servers() {
        assert_eq!(
            render_resolv(&["1.1.1.1".into(), "9.9.9.9".into()]),
            "nameserver 1.1.1.1\nnameserver 9.9.9.9\n"
        );
    }
}
