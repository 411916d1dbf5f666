//! The FUSE frontend: serves a [`Volume`] at a mount point, in the daemon's own process.
//!
//! - Owners: the volume stores VE-relative ids (0..count); the kernel sees host ids
//!   (`uid_base + id`), so a template's files belong to each VE's own root without a
//!   chown or copy, and a volume can move to a node that maps the VE elsewhere.
//! - Template files opened read-only are served by FUSE passthrough from the one template
//!   copy on the node: every VE of that template shares its page cache.
//! - Permissions are checked by the kernel (`default_permissions`); `allow_other` lets
//!   the VE's mapped users in.
//! - fsync/fdatasync/O_SYNC/O_DSYNC return once the covering transactions are durable.

use crate::stats::FsOp;
use crate::tx::{FileKind, Ino};
use crate::view::{Attr, FsResult};
use crate::volume::{SetAttr, Volume};
pub use crate::xattr::IdMap;
use crate::xattr::{self, Source};
use fuser::{
    BackingId, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, MountOption, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const TTL: Duration = Duration::from_secs(1);
pub use crate::volume::FLUSH_INTERVAL;

/// A directory listing as handed to the kernel: (ino, type, name), "." and ".." first.
type Listing = Arc<Vec<(Ino, FileType, Vec<u8>)>>;

enum Handle {
    /// A private file: reads and writes go through the volume.
    Private { ino: Ino, sync: bool },
    /// A template file read by the kernel directly (passthrough).
    Passthrough { ino: Ino },
    /// A template file read through us (passthrough unavailable).
    Lower { file: std::fs::File },
    /// An open directory: the listing as of opendir (or the last rewind), so that offsets
    /// stay meaningful while the directory changes.
    Dir { listing: Listing },
}

pub struct VolumeFs {
    vol: Arc<Volume>,
    ids: IdMap,
    handles: Mutex<HashMap<u64, Handle>>,
    next_fh: AtomicU64,
    /// One backing file per template inode while it has passthrough handles.
    backing: Mutex<HashMap<Ino, (Arc<BackingId>, u32)>>,
    passthrough: std::sync::atomic::AtomicBool,
}

fn ts(ns: i64) -> SystemTime {
    if ns >= 0 {
        UNIX_EPOCH + Duration::from_nanos(ns as u64)
    } else {
        UNIX_EPOCH - Duration::from_nanos(ns.unsigned_abs())
    }
}

fn time_ns(t: TimeOrNow) -> i64 {
    let t = match t {
        TimeOrNow::SpecificTime(t) => t,
        TimeOrNow::Now => SystemTime::now(),
    };
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_nanos() as i64,
        Err(e) => -(e.duration().as_nanos() as i64),
    }
}

fn ftype(k: FileKind) -> FileType {
    match k {
        FileKind::File => FileType::RegularFile,
        FileKind::Dir => FileType::Directory,
        FileKind::Symlink => FileType::Symlink,
        FileKind::Fifo => FileType::NamedPipe,
        FileKind::Socket => FileType::Socket,
        FileKind::CharDev => FileType::CharDevice,
        FileKind::BlockDev => FileType::BlockDevice,
    }
}

fn kind_of_mode(mode: u32) -> Option<FileKind> {
    Some(match mode & libc::S_IFMT {
        libc::S_IFREG | 0 => FileKind::File,
        libc::S_IFDIR => FileKind::Dir,
        libc::S_IFLNK => FileKind::Symlink,
        libc::S_IFIFO => FileKind::Fifo,
        libc::S_IFSOCK => FileKind::Socket,
        libc::S_IFCHR => FileKind::CharDev,
        libc::S_IFBLK => FileKind::BlockDev,
        _ => return None,
    })
}

fn err(e: i32) -> Errno {
    Errno::from_i32(e)
}

impl VolumeFs {
    pub fn new(vol: Arc<Volume>, ids: IdMap) -> VolumeFs {
        VolumeFs {
            vol,
            ids,
            handles: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            backing: Mutex::new(HashMap::new()),
            passthrough: std::sync::atomic::AtomicBool::new(false),
        }
    }

    fn fattr(&self, a: &Attr) -> FileAttr {
        FileAttr {
            ino: INodeNo(a.ino),
            size: a.size,
            blocks: a.blocks,
            atime: ts(a.atime_ns),
            mtime: ts(a.mtime_ns),
            ctime: ts(a.ctime_ns),
            crtime: ts(a.ctime_ns),
            kind: ftype(a.kind),
            perm: (a.perm & 0o7777) as u16,
            nlink: a.nlink,
            uid: self.ids.to_host(a.uid),
            gid: self.ids.to_host(a.gid),
            rdev: a.rdev as u32,
            blksize: 4096,
            flags: 0,
        }
    }

    fn entry(&self, r: FsResult<Attr>, reply: ReplyEntry) {
        match r {
            Ok(a) => reply.entry(&TTL, &self.fattr(&a), Generation(0)),
            Err(e) => reply.error(err(e)),
        }
    }

    /// Create a node owned by the caller (VE-relative ids).
    #[allow(clippy::too_many_arguments)]
    fn make(
        &self,
        req: &Request,
        parent: INodeNo,
        n: &OsStr,
        kind: FileKind,
        mode: u32,
        rdev: u64,
        target: &[u8],
    ) -> FsResult<Attr> {
        self.vol.mknod(
            parent.0,
            name(n),
            kind,
            mode & 0o7777,
            self.ids.from_host(req.uid()),
            self.ids.from_host(req.gid()),
            rdev,
            target,
        )
    }

    fn add_handle(&self, h: Handle) -> u64 {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.handles.lock().unwrap_or_else(|p| p.into_inner()).insert(fh, h);
        fh
    }

    /// A directory's entries with "." and "..".
    fn listing(&self, dir: Ino) -> FsResult<Listing> {
        let (parent, entries) = self.vol.readdir(dir)?;
        let mut v = Vec::with_capacity(entries.len() + 2);
        v.push((dir, FileType::Directory, b".".to_vec()));
        v.push((parent, FileType::Directory, b"..".to_vec()));
        v.extend(entries.into_iter().map(|(n, i, k)| (i, ftype(k), n)));
        Ok(Arc::new(v))
    }
}

/// The attributes of a negative lookup reply (node id 0: "no such name").
fn negative_attr() -> FileAttr {
    FileAttr {
        ino: INodeNo(0),
        size: 0,
        blocks: 0,
        atime: UNIX_EPOCH,
        mtime: UNIX_EPOCH,
        ctime: UNIX_EPOCH,
        crtime: UNIX_EPOCH,
        kind: FileType::RegularFile,
        perm: 0,
        nlink: 0,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

fn name(n: &OsStr) -> &[u8] {
    n.as_bytes()
}

impl Filesystem for VolumeFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        if config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok() && config.set_max_stack_depth(1).is_ok() {
            self.passthrough.store(true, Ordering::Relaxed);
        }
        let _ = config.set_max_write(1 << 20);
        let _ = config.set_max_readahead(1 << 20);
        Ok(())
    }

    fn destroy(&mut self) {
        if let Err(e) = self.vol.checkpoint() {
            eprintln!("vessel-fs: {e}");
        }
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, n: &OsStr, reply: ReplyEntry) {
        let _t = self.vol.stats().time(FsOp::Lookup);
        match self.vol.lookup(parent.0, name(n)) {
            // A negative entry (node id 0) the kernel may cache as long as a positive one:
            // `unlink`/`stat` then `open(O_CREAT)` of a new name asks once, not twice. Changes
            // through the mount drop such entries at once; a daemon-side revert shows within
            // the TTL, as attributes always did.
            Err(libc::ENOENT) => reply.entry(&TTL, &negative_attr(), Generation(0)),
            r => self.entry(r, reply),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let _t = self.vol.stats().time(FsOp::Getattr);
        match self.vol.getattr(ino.0) {
            Ok(a) => reply.attr(&TTL, &self.fattr(&a)),
            Err(e) => reply.error(err(e)),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let _t = self.vol.stats().time(FsOp::Setattr);
        let a = SetAttr {
            mode,
            uid: uid.map(|u| self.ids.from_host(u)),
            gid: gid.map(|g| self.ids.from_host(g)),
            size,
            atime_ns: atime.map(time_ns),
            mtime_ns: mtime.map(time_ns),
        };
        match self.vol.setattr(ino.0, &a) {
            Ok(a) => reply.attr(&TTL, &self.fattr(&a)),
            Err(e) => reply.error(err(e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let _t = self.vol.stats().time(FsOp::Readlink);
        match self.vol.readlink(ino.0) {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(err(e)),
        }
    }

    fn mknod(&self, req: &Request, parent: INodeNo, n: &OsStr, mode: u32, umask: u32, rdev: u32, reply: ReplyEntry) {
        let _t = self.vol.stats().time(FsOp::Mknod);
        let Some(kind) = kind_of_mode(mode) else {
            return reply.error(Errno::EINVAL);
        };
        let r = self.make(req, parent, n, kind, mode & !umask, rdev as u64, b"");
        self.entry(r, reply);
    }

    fn mkdir(&self, req: &Request, parent: INodeNo, n: &OsStr, mode: u32, umask: u32, reply: ReplyEntry) {
        let _t = self.vol.stats().time(FsOp::Mkdir);
        let r = self.make(req, parent, n, FileKind::Dir, mode & !umask, 0, b"");
        self.entry(r, reply);
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, n: &OsStr, reply: ReplyEmpty) {
        let _t = self.vol.stats().time(FsOp::Unlink);
        match self.vol.remove(parent.0, name(n), false) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(err(e)),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, n: &OsStr, reply: ReplyEmpty) {
        let _t = self.vol.stats().time(FsOp::Rmdir);
        match self.vol.remove(parent.0, name(n), true) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(err(e)),
        }
    }

    fn symlink(&self, req: &Request, parent: INodeNo, n: &OsStr, target: &Path, reply: ReplyEntry) {
        let _t = self.vol.stats().time(FsOp::Symlink);
        let r = self.make(
            req,
            parent,
            n,
            FileKind::Symlink,
            0o777,
            0,
            target.as_os_str().as_bytes(),
        );
        self.entry(r, reply);
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        n: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let _t = self.vol.stats().time(FsOp::Rename);
        match self
            .vol
            .rename(parent.0, name(n), newparent.0, name(newname), flags.bits())
        {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(err(e)),
        }
    }

    fn link(&self, _req: &Request, ino: INodeNo, newparent: INodeNo, newname: &OsStr, reply: ReplyEntry) {
        let _t = self.vol.stats().time(FsOp::Link);
        self.entry(self.vol.link(ino.0, newparent.0, name(newname)), reply);
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let _t = self.vol.stats().time(FsOp::Open);
        let f = flags.0;
        let write = f & libc::O_ACCMODE != libc::O_RDONLY;
        let trunc = f & libc::O_TRUNC != 0;
        let sync = f & (libc::O_SYNC | libc::O_DSYNC) != 0;
        match self.vol.open_file(ino.0, write, trunc) {
            Ok(true) => {
                let fh = self.add_handle(Handle::Private { ino: ino.0, sync });
                reply.opened(FileHandle(fh), FopenFlags::empty());
            }
            Ok(false) => {
                // A template file, read-only.
                let file = match self.vol.open_lower(ino.0) {
                    Ok(f) => f,
                    Err(e) => return reply.error(err(e)),
                };
                if self.passthrough.load(Ordering::Relaxed) {
                    let mut b = self.backing.lock().unwrap_or_else(|p| p.into_inner());
                    let id = match b.get_mut(&ino.0) {
                        Some((id, n)) => {
                            *n += 1;
                            Some(id.clone())
                        }
                        None => match reply.open_backing(&file) {
                            Ok(id) => {
                                let id = Arc::new(id);
                                b.insert(ino.0, (id.clone(), 1));
                                Some(id)
                            }
                            Err(_) => None,
                        },
                    };
                    drop(b);
                    if let Some(id) = id {
                        let fh = self.add_handle(Handle::Passthrough { ino: ino.0 });
                        return reply.opened_passthrough(FileHandle(fh), FopenFlags::empty(), &id);
                    }
                }
                let fh = self.add_handle(Handle::Lower { file });
                reply.opened(FileHandle(fh), FopenFlags::FOPEN_KEEP_CACHE);
            }
            Err(e) => reply.error(err(e)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let _t = self.vol.stats().time(FsOp::Read);
        let lower = {
            let h = self.handles.lock().unwrap_or_else(|p| p.into_inner());
            match h.get(&fh.0) {
                Some(Handle::Lower { file }) => Some(file.try_clone()),
                _ => None,
            }
        };
        let r = match lower {
            Some(Ok(f)) => crate::volume::read_at(&f, offset, size),
            Some(Err(e)) => Err(e.raw_os_error().unwrap_or(libc::EIO)),
            None => self.vol.read(ino.0, offset, size),
        };
        match r {
            Ok(d) => reply.data(&d),
            Err(e) => reply.error(err(e)),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let _t = self.vol.stats().time(FsOp::Write);
        let sync = {
            let h = self.handles.lock().unwrap_or_else(|p| p.into_inner());
            match h.get(&fh.0) {
                Some(Handle::Private { sync, .. }) => *sync,
                Some(_) => return reply.error(Errno::EBADF),
                None => false,
            }
        } || flags.0 & (libc::O_SYNC | libc::O_DSYNC) != 0;
        match self.vol.write(ino.0, offset, data) {
            Ok(n) => {
                if sync {
                    if let Err(e) = self.vol.sync() {
                        return reply.error(err(e));
                    }
                }
                reply.written(n)
            }
            Err(e) => reply.error(err(e)),
        }
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _lock_owner: LockOwner, reply: ReplyEmpty) {
        let _t = self.vol.stats().time(FsOp::Flush);
        // Nothing to do at close (writes are transactions already; locks are the kernel's).
        // ENOSYS tells the kernel so once: it sends no FLUSH on this mount again, which
        // saves a round trip at every close(2) (two or three per file a tar extracts).
        reply.error(Errno::ENOSYS);
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let _t = self.vol.stats().time(FsOp::Release);
        let h = self.handles.lock().unwrap_or_else(|p| p.into_inner()).remove(&fh.0);
        match h {
            Some(Handle::Private { ino, .. }) => self.vol.release(ino),
            Some(Handle::Passthrough { ino }) => {
                let mut b = self.backing.lock().unwrap_or_else(|p| p.into_inner());
                if let Some((_, n)) = b.get_mut(&ino) {
                    *n -= 1;
                    if *n == 0 {
                        b.remove(&ino);
                    }
                }
            }
            _ => {}
        }
        reply.ok();
    }

    fn fsync(&self, req: &Request, ino: INodeNo, fh: FileHandle, datasync: bool, reply: ReplyEmpty) {
        let _t = self.vol.stats().time(FsOp::Fsync);
        // One log covers files and directories alike.
        self.fsyncdir(req, ino, fh, datasync, reply)
    }

    fn fsyncdir(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        let _t = self.vol.stats().time(FsOp::Fsyncdir);
        match self.vol.sync() {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(err(e)),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let _t = self.vol.stats().time(FsOp::Opendir);
        match self.listing(ino.0) {
            Ok(listing) => {
                let fh = self.add_handle(Handle::Dir { listing });
                reply.opened(FileHandle(fh), FopenFlags::empty());
            }
            Err(e) => reply.error(err(e)),
        }
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let _t = self.vol.stats().time(FsOp::Readdir);
        // Offset 0 (a new pass or rewinddir) sees the directory as it is now.
        let snapshot = {
            let h = self.handles.lock().unwrap_or_else(|p| p.into_inner());
            match h.get(&fh.0) {
                Some(Handle::Dir { listing }) if offset > 0 => Some(listing.clone()),
                _ => None,
            }
        };
        let listing = match snapshot {
            Some(l) => l,
            None => match self.listing(ino.0) {
                Ok(l) => {
                    let mut h = self.handles.lock().unwrap_or_else(|p| p.into_inner());
                    if let Some(Handle::Dir { listing }) = h.get_mut(&fh.0) {
                        *listing = l.clone();
                    }
                    l
                }
                Err(e) => return reply.error(err(e)),
            },
        };
        for (i, (ino, kind, n)) in listing.iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(*ino), (i + 1) as u64, *kind, OsStr::from_bytes(n)) {
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, _flags: OpenFlags, reply: ReplyEmpty) {
        let _t = self.vol.stats().time(FsOp::Releasedir);
        self.handles.lock().unwrap_or_else(|p| p.into_inner()).remove(&fh.0);
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let _t = self.vol.stats().time(FsOp::Statfs);
        let (u, q) = self.vol.usage();
        // Without a quota, report the host file system holding the volume.
        let host = nix::sys::statvfs::statvfs(self.vol.dir()).ok();
        let bsize = 4096u64;
        let (blocks, bfree) = match q.bytes {
            Some(b) => (b / bsize, b.saturating_sub(u.bytes) / bsize),
            None => host
                .as_ref()
                .map(|s| {
                    let f = s.fragment_size().max(1);
                    (s.blocks() * f / bsize, s.blocks_available() * f / bsize)
                })
                .unwrap_or((0, 0)),
        };
        let (files, ffree) = match q.inodes {
            Some(i) => (i, i.saturating_sub(u.inodes)),
            None => host.map(|s| (s.files(), s.files_available())).unwrap_or((0, 0)),
        };
        reply.statfs(blocks, bfree, bfree, files, ffree, bsize as u32, 255, bsize as u32);
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        n: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let _t = self.vol.stats().time(FsOp::Setxattr);
        // The same rules as for an imported archive (crate::xattr), with host ids.
        let inc = match xattr::incoming(name(n), value, Source::Mount(self.ids)) {
            Ok(i) => i,
            Err(e) => return reply.error(err(e.errno())),
        };
        let r = self.vol.apply_xattr(
            ino.0,
            name(n),
            inc,
            flags & libc::XATTR_CREATE != 0,
            flags & libc::XATTR_REPLACE != 0,
        );
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(err(e)),
        }
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, n: &OsStr, size: u32, reply: ReplyXattr) {
        let _t = self.vol.stats().time(FsOp::Getxattr);
        match self.vol.getxattr(ino.0, name(n)) {
            Ok(v) => {
                let v = if name(n) == xattr::CAPS {
                    // Never capabilities rooted outside the VE's ids.
                    match xattr::caps_out(&v, &self.ids) {
                        Some(v) => v,
                        None => return reply.error(Errno::ENODATA),
                    }
                } else if name(n) == xattr::ACL_ACCESS || name(n) == xattr::ACL_DEFAULT {
                    xattr::acl_out(&v, &self.ids)
                } else {
                    v
                };
                if size == 0 {
                    reply.size(v.len() as u32)
                } else if (size as usize) < v.len() {
                    reply.error(Errno::ERANGE)
                } else {
                    reply.data(&v)
                }
            }
            Err(e) => reply.error(err(e)),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let _t = self.vol.stats().time(FsOp::Listxattr);
        match self.vol.listxattr(ino.0) {
            Ok(names) => {
                let mut buf = Vec::new();
                for n in names {
                    buf.extend_from_slice(&n);
                    buf.push(0);
                }
                if size == 0 {
                    reply.size(buf.len() as u32)
                } else if (size as usize) < buf.len() {
                    reply.error(Errno::ERANGE)
                } else {
                    reply.data(&buf)
                }
            }
            Err(e) => reply.error(err(e)),
        }
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, n: &OsStr, reply: ReplyEmpty) {
        let _t = self.vol.stats().time(FsOp::Removexattr);
        match self.vol.removexattr(ino.0, name(n)) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(err(e)),
        }
    }

    fn create(&self, req: &Request, parent: INodeNo, n: &OsStr, mode: u32, umask: u32, flags: i32, reply: ReplyCreate) {
        let _t = self.vol.stats().time(FsOp::Create);
        let Some(kind) = kind_of_mode(mode) else {
            return reply.error(Errno::EINVAL);
        };
        let r = self.make(req, parent, n, kind, mode & !umask, 0, b"");
        let a = match r {
            Ok(a) => a,
            Err(e) => return reply.error(err(e)),
        };
        if let Err(e) = self.vol.open_file(a.ino, true, false) {
            return reply.error(err(e));
        }
        let sync = flags & (libc::O_SYNC | libc::O_DSYNC) != 0;
        let fh = self.add_handle(Handle::Private { ino: a.ino, sync });
        reply.created(
            &TTL,
            &self.fattr(&a),
            Generation(0),
            FileHandle(fh),
            FopenFlags::empty(),
        );
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let _t = self.vol.stats().time(FsOp::Fallocate);
        match self.vol.fallocate(ino.0, offset, length, mode as u32) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(err(e)),
        }
    }
}

/// Each FUSE worker thread has a 16 MiB request buffer. glibc raises its mmap threshold
/// after large blocks are freed, and then serves such buffers from the heap, where calloc
/// must zero (touch) all of it: tens of MiB per volume. A fixed threshold keeps them as
/// fresh mappings whose untouched pages cost nothing. Call once, early, in the daemon.
pub fn keep_big_buffers_unmapped() {
    // SAFETY: mallopt only changes allocator tuning; M_MMAP_THRESHOLD with a valid size.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 10);
    }
}

/// Mount options every vessel-fs mount uses. The host-side mount never honours setuid bits
/// or device nodes (a VE's root plants whatever it likes in its tree); the VE's own view is
/// a bind of it that honours setuid, made where only the VE sees it (vessel-ve `runtime`).
pub fn mount_config(threads: usize) -> fuser::Config {
    let mut c = fuser::Config::default();
    c.mount_options = vec![
        MountOption::FSName("vessel-fs".into()),
        MountOption::Subtype("vessel".into()),
        MountOption::DefaultPermissions,
        MountOption::NoSuid,
        MountOption::NoDev,
        MountOption::Exec,
        MountOption::RW,
    ];
    c.acl = fuser::SessionACL::All;
    c.n_threads = Some(threads.max(1));
    c.clone_fd = threads > 1;
    c
}

/// A mounted volume; unmounts (and checkpoints) when dropped.
pub struct Mounted {
    pub volume: Arc<Volume>,
    session: Option<fuser::BackgroundSession>,
    upkeep: Option<crate::volume::Maintainer>,
}

impl Mounted {
    pub fn unmount(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        drop(self.upkeep.take());
        if let Some(s) = self.session.take() {
            let _ = s.umount_and_join();
        }
        if let Err(e) = self.volume.checkpoint() {
            eprintln!("vessel-fs: {e}");
        }
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Serve `vol` at `at` from threads of this process, with its upkeep running (see
/// [`crate::volume::Maintainer`]).
pub fn mount(vol: Arc<Volume>, ids: IdMap, at: &Path, threads: usize) -> std::io::Result<Mounted> {
    let fs = VolumeFs::new(vol.clone(), ids);
    let session = fuser::Session::new(fs, at, &mount_config(threads))?.spawn()?;
    let upkeep = crate::volume::Maintainer::start(&vol)?;
    Ok(Mounted {
        volume: vol,
        session: Some(session),
        upkeep: Some(upkeep),
    })
}
