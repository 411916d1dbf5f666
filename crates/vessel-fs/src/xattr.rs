//! The rules for the extended attributes a VE's files may hold, shared by every way in:
//! the FUSE frontend (a process of the VE, or the host's administrator, writing through
//! the mount: ids are host ids and the kernel has already checked the writer's rights) and
//! `ve import` (an archive: ids are VE-relative and nothing in it is trusted).
//!
//! Stored forms (VE-relative, so a volume can move to a node that maps the VE elsewhere):
//! - `security.capability`: v2 (20 bytes) for capabilities rooted at the VE's root, v3
//!   (24 bytes) with a VE-relative root id for those rooted at another of the VE's users
//!   (a user namespace nested in the VE). The kernel is shown v3 rooted at the host id of
//!   that user, so the capabilities never apply to a process outside the VE's range.
//! - POSIX ACLs: named entries carry VE-relative ids; an access ACL also sets the mode.

use crate::tx::FileKind;

/// Ids a VE's tree may hold (VE-relative): the size of every VE's id range.
pub const VE_IDS: u32 = 65536;

pub const CAPS: &[u8] = b"security.capability";
pub const ACL_ACCESS: &[u8] = b"system.posix_acl_access";
pub const ACL_DEFAULT: &[u8] = b"system.posix_acl_default";
/// Longest attribute name and value the kernel passes (XATTR_NAME_MAX, XATTR_SIZE_MAX).
pub const NAME_MAX: usize = 255;
pub const VALUE_MAX: usize = 65536;

const VFS_CAP_REVISION_MASK: u32 = 0xff00_0000;
const VFS_CAP_REVISION_2: u32 = 0x0200_0000;
const VFS_CAP_REVISION_3: u32 = 0x0300_0000;
const VFS_CAP_FLAGS_EFFECTIVE: u32 = 0x0000_0001;

const ACL_USER_OBJ: u16 = 0x01;
const ACL_USER: u16 = 0x02;
const ACL_GROUP_OBJ: u16 = 0x04;
const ACL_GROUP: u16 = 0x08;
const ACL_MASK: u16 = 0x10;
const ACL_OTHER: u16 = 0x20;
const ACL_VERSION: u32 = 2;

/// How a VE's ids map to host ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdMap {
    pub base: u32,
    pub count: u32,
}

impl IdMap {
    pub fn to_host(&self, id: u32) -> u32 {
        if id < self.count {
            self.base + id
        } else {
            self.base + self.count.saturating_sub(2).min(65534)
        }
    }
    /// Host ids outside the VE's range (the host's administrator) act as the VE's root.
    pub fn from_host(&self, id: u32) -> u32 {
        if id >= self.base && id - self.base < self.count {
            id - self.base
        } else if id == 0 {
            0
        } else {
            65534
        }
    }
    /// The VE-relative id of a host id inside the range.
    fn relative(&self, id: u32) -> Option<u32> {
        id.checked_sub(self.base).filter(|r| *r < self.count)
    }
}

/// Where an attribute comes from.
#[derive(Debug, Clone, Copy)]
pub enum Source {
    /// Written through the VE's mount (host ids; the kernel checked the writer).
    Mount(IdMap),
    /// From an export archive (VE-relative ids; untrusted).
    Archive,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum XattrError {
    #[error("extended attribute {0}: a VE cannot hold it (only `user.*`, `security.capability` and POSIX ACLs travel with a VE)")]
    NotAllowed(String),
    #[error("extended attribute {0}: malformed value ({1})")]
    Malformed(String, &'static str),
    #[error("extended attribute {name}: id {id} is outside the VE's ids 0..{VE_IDS}")]
    ForeignId { name: String, id: u32 },
    #[error("extended attribute {name}: its name or value is over the kernel's limit")]
    TooLarge { name: String },
}

impl XattrError {
    /// The errno a process writing through the mount sees.
    pub fn errno(&self) -> i32 {
        match self {
            XattrError::NotAllowed(_) => libc::EPERM,
            XattrError::TooLarge { .. } => libc::E2BIG,
            _ => libc::EINVAL,
        }
    }
}

/// What to do with an incoming attribute.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    /// Store this value.
    Store(Vec<u8>),
    /// An access ACL that says no more than the permission bits: set them, keep no attribute.
    ModeOnly(u32),
    /// Store this access ACL and set the permission bits it implies.
    AclWithMode(Vec<u8>, u32),
    /// Not kept (host-only labels such as `security.selinux` or `trusted.*` in an archive).
    Drop,
}

fn lossy(name: &[u8]) -> String {
    String::from_utf8_lossy(name).into_owned()
}

/// The stored form of `name` = `value` written from `src`, or why it is refused.
pub fn incoming(name: &[u8], value: &[u8], src: Source) -> Result<Incoming, XattrError> {
    if name.len() > NAME_MAX || value.len() > VALUE_MAX {
        return Err(XattrError::TooLarge { name: lossy(name) });
    }
    if name == CAPS {
        return caps_in(value, src).map(Incoming::Store);
    }
    if name == ACL_ACCESS || name == ACL_DEFAULT {
        let mapped = acl_in(name, value, src)?;
        if name == ACL_DEFAULT {
            return Ok(Incoming::Store(mapped));
        }
        let e = acl_entries(&mapped).expect("validated");
        let (bits, minimal) = acl_mode(&e);
        return Ok(if minimal {
            Incoming::ModeOnly(bits)
        } else {
            Incoming::AclWithMode(mapped, bits)
        });
    }
    match src {
        // The kernel already allowed it (`trusted.*` and other `security.*` only for the
        // host's administrator).
        Source::Mount(_) => Ok(Incoming::Store(value.to_vec())),
        Source::Archive => {
            if name.starts_with(b"user.") && name.len() > 5 {
                Ok(Incoming::Store(value.to_vec()))
            } else if name.starts_with(b"trusted.") || name.starts_with(b"security.") || name.starts_with(b"system.") {
                // Labels of the host the export came from: never the VE's to set.
                Ok(Incoming::Drop)
            } else {
                Err(XattrError::NotAllowed(lossy(name)))
            }
        }
    }
}

/// Whether an export carries this stored attribute (what an import would drop is left out).
pub fn exported(name: &[u8]) -> bool {
    (name.starts_with(b"user.") && name.len() > 5) || name == CAPS || name == ACL_ACCESS || name == ACL_DEFAULT
}

/// (flags, capability sets, root id) of a v2 (root id None) or v3 value.
fn parse_caps(v: &[u8]) -> Option<(u32, [u8; 16], Option<u32>)> {
    let le = |r: std::ops::Range<usize>| u32::from_le_bytes(v[r].try_into().expect("4 bytes"));
    let root = match v.len() {
        20 if le(0..4) & VFS_CAP_REVISION_MASK == VFS_CAP_REVISION_2 => None,
        24 if le(0..4) & VFS_CAP_REVISION_MASK == VFS_CAP_REVISION_3 => Some(le(20..24)),
        _ => return None,
    };
    let flags = le(0..4) & !VFS_CAP_REVISION_MASK;
    if flags & !VFS_CAP_FLAGS_EFFECTIVE != 0 {
        return None;
    }
    Some((flags, v[4..20].try_into().expect("16 bytes"), root))
}

fn caps_bytes(flags: u32, sets: &[u8; 16], root: u32) -> Vec<u8> {
    let rev = if root == 0 {
        VFS_CAP_REVISION_2
    } else {
        VFS_CAP_REVISION_3
    };
    let mut v = (rev | flags).to_le_bytes().to_vec();
    v.extend_from_slice(sets);
    if root != 0 {
        v.extend_from_slice(&root.to_le_bytes());
    }
    v
}

fn caps_in(v: &[u8], src: Source) -> Result<Vec<u8>, XattrError> {
    let name = || lossy(CAPS);
    let (flags, sets, root) = parse_caps(v)
        .ok_or_else(|| XattrError::Malformed(name(), "not a v2 or v3 capability set (VFS_CAP_REVISION_2/3)"))?;
    let rel = match (root, src) {
        // v2 only comes from a writer privileged on the host (or the VE's own export):
        // rooted at the VE's root.
        (None, _) => 0,
        (Some(r), Source::Mount(ids)) => ids.relative(r).ok_or(XattrError::ForeignId { name: name(), id: r })?,
        (Some(r), Source::Archive) if r < VE_IDS => r,
        (Some(r), Source::Archive) => return Err(XattrError::ForeignId { name: name(), id: r }),
    };
    Ok(caps_bytes(flags, &sets, rel))
}

/// The `security.capability` value the kernel sees for a stored one: v3 rooted at the
/// host id of the VE user it belongs to. None: nothing a process may be given (malformed,
/// or rooted outside the VE).
pub fn caps_out(stored: &[u8], ids: &IdMap) -> Option<Vec<u8>> {
    let (flags, sets, root) = parse_caps(stored)?;
    let host = match root {
        None => ids.base,
        Some(r) if r < ids.count => ids.base + r,
        // Written by an earlier version in host form.
        Some(r) => ids.relative(r).map(|_| r)?,
    };
    let mut v = (VFS_CAP_REVISION_3 | flags).to_le_bytes().to_vec();
    v.extend_from_slice(&sets);
    v.extend_from_slice(&host.to_le_bytes());
    Some(v)
}

/// A POSIX ACL in its xattr form: (tag, perm, id) entries after a version header.
pub fn acl_entries(v: &[u8]) -> Option<Vec<(u16, u16, u32)>> {
    if v.len() < 4 || !(v.len() - 4).is_multiple_of(8) || u32::from_le_bytes(v[0..4].try_into().ok()?) != ACL_VERSION {
        return None;
    }
    Some(
        v[4..]
            .chunks(8)
            .map(|e| {
                (
                    u16::from_le_bytes([e[0], e[1]]),
                    u16::from_le_bytes([e[2], e[3]]),
                    u32::from_le_bytes([e[4], e[5], e[6], e[7]]),
                )
            })
            .collect(),
    )
}

fn acl_bytes(e: &[(u16, u16, u32)]) -> Vec<u8> {
    let mut v = ACL_VERSION.to_le_bytes().to_vec();
    for (t, p, i) in e {
        v.extend_from_slice(&t.to_le_bytes());
        v.extend_from_slice(&p.to_le_bytes());
        v.extend_from_slice(&i.to_le_bytes());
    }
    v
}

/// The kernel's rules for an ACL (posix_acl_valid): known tags in order, one owner, group
/// and other entry, named entries sorted by id without repeats, a mask when there are any.
fn acl_valid(e: &[(u16, u16, u32)]) -> Result<(), &'static str> {
    let rank = |t: u16| match t {
        ACL_USER_OBJ => Some(0),
        ACL_USER => Some(1),
        ACL_GROUP_OBJ => Some(2),
        ACL_GROUP => Some(3),
        ACL_MASK => Some(4),
        ACL_OTHER => Some(5),
        _ => None,
    };
    let mut last: Option<(u8, u32)> = None;
    let (mut named, mut counts) = (false, [0u32; 6]);
    for &(t, p, id) in e {
        let r = rank(t).ok_or("unknown entry tag")?;
        if p & !7 != 0 {
            return Err("permission bits beyond rwx");
        }
        if let Some((lr, lid)) = last {
            if r < lr || (r == lr && (r == 1 || r == 3) && id <= lid) {
                return Err("entries out of order or repeated");
            }
        }
        counts[r as usize] += 1;
        named |= r == 1 || r == 3;
        last = Some((r, id));
    }
    if counts[0] != 1 || counts[2] != 1 || counts[5] != 1 || counts[4] > 1 || (named && counts[4] == 0) {
        return Err("needs one owner, group and other entry (and a mask with named entries)");
    }
    Ok(())
}

fn acl_in(name: &[u8], v: &[u8], src: Source) -> Result<Vec<u8>, XattrError> {
    let bad = |why| XattrError::Malformed(lossy(name), why);
    let e = acl_entries(v).ok_or_else(|| bad("not a version 2 POSIX ACL"))?;
    acl_valid(&e).map_err(bad)?;
    let mut out = Vec::with_capacity(e.len());
    for (t, p, id) in e {
        let id = if t == ACL_USER || t == ACL_GROUP {
            match src {
                Source::Mount(ids) => ids.from_host(id),
                Source::Archive if id < VE_IDS => id,
                Source::Archive => return Err(XattrError::ForeignId { name: lossy(name), id }),
            }
        } else {
            id
        };
        out.push((t, p, id));
    }
    Ok(acl_bytes(&out))
}

/// A stored ACL as the kernel sees it (named ids mapped to host ids).
pub fn acl_out(stored: &[u8], ids: &IdMap) -> Vec<u8> {
    match acl_entries(stored) {
        Some(e) => acl_bytes(
            &e.into_iter()
                .map(|(t, p, i)| {
                    if t == ACL_USER || t == ACL_GROUP {
                        (t, p, ids.to_host(i))
                    } else {
                        (t, p, i)
                    }
                })
                .collect::<Vec<_>>(),
        ),
        None => stored.to_vec(),
    }
}

/// The permission bits an access ACL implies, and whether the ACL says no more than them.
fn acl_mode(e: &[(u16, u16, u32)]) -> (u32, bool) {
    let get = |tag: u16| e.iter().find(|x| x.0 == tag).map(|x| (x.1 & 7) as u32);
    let user = get(ACL_USER_OBJ).unwrap_or(0);
    let group = get(ACL_MASK).or(get(ACL_GROUP_OBJ)).unwrap_or(0);
    let other = get(ACL_OTHER).unwrap_or(0);
    let minimal = e
        .iter()
        .all(|x| matches!(x.0, ACL_USER_OBJ | ACL_GROUP_OBJ | ACL_OTHER));
    (user << 6 | group << 3 | other, minimal)
}

/// Owners a VE's files may have (VE-relative).
pub fn owner_ok(id: u64) -> bool {
    id < VE_IDS as u64
}

/// Whether a VE's root could have made this node: no devices (`mknod` of a device needs
/// CAP_MKNOD on the host), except the 0:0 character device overlayfs uses as a whiteout,
/// and a device the template itself holds at that place (a copy-up of it).
pub fn node_ok(kind: FileKind, rdev: u64, template_has_it: bool) -> bool {
    match kind {
        FileKind::CharDev => rdev == 0 || template_has_it,
        FileKind::BlockDev => template_has_it,
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const IDS: IdMap = IdMap {
        base: 1 << 20,
        count: VE_IDS,
    };

    fn v2(sets: u8) -> Vec<u8> {
        let mut v = (VFS_CAP_REVISION_2 | 1).to_le_bytes().to_vec();
        v.extend_from_slice(&[sets; 16]);
        v
    }

    fn v3(sets: u8, root: u32) -> Vec<u8> {
        let mut v = (VFS_CAP_REVISION_3 | 1).to_le_bytes().to_vec();
        v.extend_from_slice(&[sets; 16]);
        v.extend_from_slice(&root.to_le_bytes());
        v
    }

    fn stored(r: Result<Incoming, XattrError>) -> Vec<u8> {
        match r.unwrap() {
            Incoming::Store(v) => v,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn capabilities_rooted_at_the_ve_root_are_stored_v2_and_shown_rooted_at_its_host_id() {
        // From inside the VE the kernel hands us v3 rooted at the VE root's host id.
        let s = stored(incoming(CAPS, &v3(7, IDS.base), Source::Mount(IDS)));
        assert_eq!(s, v2(7));
        assert_eq!(caps_out(&s, &IDS).unwrap(), v3(7, IDS.base));
        // The same from an archive (VE-relative) and from the host's administrator (v2).
        assert_eq!(stored(incoming(CAPS, &v2(7), Source::Archive)), v2(7));
        assert_eq!(stored(incoming(CAPS, &v3(7, 0), Source::Archive)), v2(7));
        assert_eq!(stored(incoming(CAPS, &v2(7), Source::Mount(IDS))), v2(7));
    }

    #[test]
    fn capabilities_of_a_nested_user_stay_inside_the_ve_range() {
        let s = stored(incoming(CAPS, &v3(1, IDS.base + 1000), Source::Mount(IDS)));
        assert_eq!(s, v3(1, 1000), "stored VE-relative");
        assert_eq!(caps_out(&s, &IDS).unwrap(), v3(1, IDS.base + 1000));
        let other = IdMap {
            base: 5 << 20,
            count: VE_IDS,
        };
        assert_eq!(
            caps_out(&s, &other).unwrap(),
            v3(1, other.base + 1000),
            "the volume moved"
        );
        assert_eq!(stored(incoming(CAPS, &v3(1, 1000), Source::Archive)), v3(1, 1000));
    }

    #[test]
    fn capabilities_rooted_outside_the_ve_are_refused_and_never_shown() {
        // Host root (0) and another VE's range: refused from both sides.
        for root in [0u32, 2 << 20, IDS.base + VE_IDS] {
            let e = incoming(CAPS, &v3(0xff, root), Source::Mount(IDS)).unwrap_err();
            assert_eq!(e.errno(), libc::EINVAL, "{root}");
        }
        for root in [VE_IDS, 1 << 20, u32::MAX] {
            let e = incoming(CAPS, &v3(0xff, root), Source::Archive).unwrap_err();
            assert!(matches!(e, XattrError::ForeignId { .. }), "{e}");
        }
        // Malformed: v1, unknown revisions, stray flag bits, wrong lengths.
        let mut v1 = 0x0100_0000u32.to_le_bytes().to_vec();
        v1.extend_from_slice(&[0xff; 8]);
        let mut flags = v2(1);
        flags[1] = 0x80;
        for bad in [v1, flags, vec![0; 20], v2(1)[..19].to_vec(), vec![]] {
            assert!(matches!(
                incoming(CAPS, &bad, Source::Archive),
                Err(XattrError::Malformed(..))
            ));
            assert!(incoming(CAPS, &bad, Source::Mount(IDS)).is_err());
            assert_eq!(caps_out(&bad, &IDS), None, "stored garbage is not shown");
        }
        // A value stored in host form by an earlier version: shown only inside the range.
        assert_eq!(caps_out(&v3(1, IDS.base + 7), &IDS).unwrap(), v3(1, IDS.base + 7));
        assert_eq!(caps_out(&v3(1, 2 << 20), &IDS), None);
    }

    fn acl(entries: &[(u16, u16, u32)]) -> Vec<u8> {
        acl_bytes(entries)
    }

    #[test]
    fn acls_are_validated_and_named_ids_mapped() {
        let full = [
            (ACL_USER_OBJ, 7, 0),
            (ACL_USER, 5, 1000),
            (ACL_GROUP_OBJ, 5, 0),
            (ACL_MASK, 5, 0),
            (ACL_OTHER, 0, 0),
        ];
        let host: Vec<_> = full
            .iter()
            .map(|&(t, p, i)| (t, p, if t == ACL_USER { IDS.base + i } else { i }))
            .collect();
        let r = incoming(ACL_ACCESS, &acl(&host), Source::Mount(IDS)).unwrap();
        assert_eq!(r, Incoming::AclWithMode(acl(&full), 0o750));
        assert_eq!(acl_out(&acl(&full), &IDS), acl(&host));
        assert_eq!(
            incoming(ACL_ACCESS, &acl(&full), Source::Archive).unwrap(),
            Incoming::AclWithMode(acl(&full), 0o750)
        );
        let minimal = [(ACL_USER_OBJ, 6, 0), (ACL_GROUP_OBJ, 4, 0), (ACL_OTHER, 4, 0)];
        assert_eq!(
            incoming(ACL_ACCESS, &acl(&minimal), Source::Archive).unwrap(),
            Incoming::ModeOnly(0o644)
        );
        assert_eq!(
            incoming(ACL_DEFAULT, &acl(&full), Source::Archive).unwrap(),
            Incoming::Store(acl(&full))
        );
        // A host id in an archive, bad tags, order, missing mask, garbage.
        let mut foreign = full;
        foreign[1].2 = 1 << 20;
        assert!(matches!(
            incoming(ACL_ACCESS, &acl(&foreign), Source::Archive),
            Err(XattrError::ForeignId { .. })
        ));
        let no_mask = [
            (ACL_USER_OBJ, 7, 0),
            (ACL_USER, 5, 3),
            (ACL_GROUP_OBJ, 5, 0),
            (ACL_OTHER, 0, 0),
        ];
        let bad_tag = [
            (ACL_USER_OBJ, 7, 0),
            (0x40, 5, 3),
            (ACL_GROUP_OBJ, 5, 0),
            (ACL_OTHER, 0, 0),
        ];
        let order = [(ACL_GROUP_OBJ, 5, 0), (ACL_USER_OBJ, 7, 0), (ACL_OTHER, 0, 0)];
        let perms = [(ACL_USER_OBJ, 0o17, 0), (ACL_GROUP_OBJ, 5, 0), (ACL_OTHER, 0, 0)];
        for bad in [acl(&no_mask), acl(&bad_tag), acl(&order), acl(&perms), b"junk".to_vec()] {
            assert!(matches!(
                incoming(ACL_DEFAULT, &bad, Source::Archive),
                Err(XattrError::Malformed(..))
            ));
        }
    }

    #[test]
    fn host_only_namespaces_are_dropped_from_archives_and_unknown_ones_refused() {
        assert_eq!(
            incoming(b"user.color", b"blue", Source::Archive).unwrap(),
            Incoming::Store(b"blue".to_vec())
        );
        for n in [
            &b"trusted.overlay.opaque"[..],
            b"security.selinux",
            b"security.ima",
            b"system.nfs4_acl",
        ] {
            assert_eq!(incoming(n, b"x", Source::Archive).unwrap(), Incoming::Drop);
            assert!(!exported(n));
        }
        for n in [&b"user."[..], b"bogus.x", b""] {
            assert!(matches!(
                incoming(n, b"x", Source::Archive),
                Err(XattrError::NotAllowed(_))
            ));
        }
        // Through the mount the kernel decided already.
        assert_eq!(
            incoming(b"trusted.x", b"1", Source::Mount(IDS)).unwrap(),
            Incoming::Store(b"1".to_vec())
        );
        assert!(matches!(
            incoming(b"user.big", &vec![0; VALUE_MAX + 1], Source::Archive),
            Err(XattrError::TooLarge { .. })
        ));
    }

    #[test]
    fn owners_and_devices() {
        assert!(owner_ok(0) && owner_ok(65535));
        assert!(!owner_ok(65536) && !owner_ok(u64::MAX));
        assert!(node_ok(FileKind::CharDev, 0, false), "overlay whiteout");
        assert!(!node_ok(FileKind::CharDev, libc::makedev(1, 3), false));
        assert!(!node_ok(FileKind::BlockDev, libc::makedev(8, 0), false));
        assert!(node_ok(FileKind::CharDev, libc::makedev(1, 3), true));
        assert!(node_ok(FileKind::Fifo, 0, false));
    }
}
