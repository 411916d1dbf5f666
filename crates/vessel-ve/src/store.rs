//! The node's template store (`ROOT/templates`). It holds only complete templates under
//! their ids: a build fills a staging dir of its own (`.build-<pid>-<nonce>`), syncs it and
//! renames it into place; a removal renames the template to `.trash-<id>-<pid>-<nonce>`
//! before deleting it. Scratch dirs a killed daemon left are removed by the next build.
//! One build or removal at a time per store: the node's build lock.

use crate::buildcache::unique_suffix;
use crate::template::{read_meta, scan, TemplateError, TemplateMeta};
use crate::Progress;
use std::path::{Path, PathBuf};

type Result<T> = std::result::Result<T, TemplateError>;

use crate::template::io;

const STAGING_PREFIX: &str = ".build-";
const TRASH_PREFIX: &str = ".trash-";

/// A staging dir for one build in the template store, named for this build alone.
pub fn staging_dir(templates_dir: &Path) -> PathBuf {
    templates_dir.join(format!("{STAGING_PREFIX}{}", unique_suffix()))
}

/// Whether a name in the template store is a build's staging dir or a removal's trash
/// (never a template: ids are hex).
pub fn is_scratch(name: &str) -> bool {
    [STAGING_PREFIX, TRASH_PREFIX]
        .iter()
        .any(|p| name.starts_with(p) && name.len() > p.len())
}

/// Whether `dir` is a complete template: a rename of a synced staging dir puts all three
/// in place at once, so a dir missing one was cut off while being removed.
pub fn is_installed(dir: &Path) -> bool {
    read_meta(dir).is_ok() && dir.join("manifest.json").is_file() && dir.join("rootfs").is_dir()
}

/// Remove the scratch dirs of builds and removals that did not finish (a killed daemon).
/// Call it when no build or removal runs on the node.
pub fn remove_scratch(templates_dir: &Path) -> Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    let rd = match std::fs::read_dir(templates_dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(removed),
        Err(e) => return Err(io("read directory", templates_dir)(e)),
    };
    for e in rd {
        let e = e.map_err(io("read directory", templates_dir))?;
        if is_scratch(&e.file_name().to_string_lossy()) {
            let p = e.path();
            detach_mounts_under(&p);
            std::fs::remove_dir_all(&p).map_err(io("remove", &p))?;
            removed.push(p);
        }
    }
    Ok(removed)
}

/// Remove template `id` from the store: renamed out of the way first (one atomic step),
/// then deleted, so a removal cut off halfway never leaves a partial tree under the id.
pub fn remove_template(templates_dir: &Path, id: &str) -> Result<()> {
    let dir = templates_dir.join(id);
    let trash = templates_dir.join(format!("{TRASH_PREFIX}{id}-{}", unique_suffix()));
    match std::fs::rename(&dir, &trash) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io("rename", &dir)(e)),
    }
    sync_dir(templates_dir)?;
    std::fs::remove_dir_all(&trash).map_err(io("remove", &trash))
}

/// Mount points at or below `dir`, deepest first, from /proc/self/mountinfo's text.
fn mounts_under(mountinfo: &str, dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| PathBuf::from(m.replace("\\040", " ")))
        .filter(|m| m.starts_with(dir))
        .collect();
    v.sort_by_key(|m| std::cmp::Reverse(m.as_os_str().len()));
    v
}

/// Detach what an older build left mounted in a staging dir (debootstrap's proc and sys
/// when it was killed), so removing the dir never reaches into them.
fn detach_mounts_under(dir: &Path) {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    for m in mounts_under(&info, dir) {
        if let Ok(c) = std::ffi::CString::new(m.as_os_str().as_encoded_bytes()) {
            // SAFETY: a NUL-terminated path; a lazy unmount of a mount below our own store.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("fsync", dir))
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = std::fs::File::create(path).map_err(io("create", path))?;
    std::io::Write::write_all(&mut f, bytes).map_err(io("write", path))?;
    f.sync_all().map_err(io("fsync", path))
}

/// Hash a freshly built tree and move it into the template store under its content
/// address. Returns the id; if an identical template exists, the new copy is dropped.
/// Call it with the node's build lock held (one install at a time per store).
pub fn install(
    templates_dir: &Path,
    staging: &Path,
    mut meta: TemplateMeta,
    progress: &mut Progress,
) -> Result<(String, TemplateMeta)> {
    progress("hashing template files", 0, 0);
    let rootfs = staging.join("rootfs");
    let manifest = scan(&rootfs)?;
    let id = manifest.id();
    meta.files = manifest.entries.len() as u64;
    meta.bytes = manifest.bytes();
    meta.created_unix = crate::now_unix();
    let dest = templates_dir.join(&id);
    if is_installed(&dest) {
        let _ = std::fs::remove_dir_all(staging);
        let existing = read_meta(&dest)?;
        return Ok((id, existing));
    }
    let mpath = staging.join("manifest.json");
    write_synced(&mpath, &serde_json::to_vec(&manifest).expect("serializes"))?;
    let tpath = staging.join("template.json");
    write_synced(&tpath, &serde_json::to_vec_pretty(&meta).expect("serializes"))?;
    progress("writing the template to disk", 0, 0);
    let sdir = std::fs::File::open(staging).map_err(io("open", staging))?;
    // SAFETY: syncfs on an fd we own.
    if unsafe { libc::syncfs(std::os::fd::AsRawFd::as_raw_fd(&sdir)) } != 0 {
        return Err(io("sync", staging)(std::io::Error::last_os_error()));
    }
    // Whatever is under the id is not a template (a removal cut off): out of the way.
    remove_template(templates_dir, &id)?;
    std::fs::rename(staging, &dest).map_err(io("rename", staging))?;
    sync_dir(templates_dir)?;
    Ok((id, meta))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::template::{Manifest, MANIFEST_VERSION};
    use vessel_types::api::TemplateKind;

    #[test]
    fn scratch_names_never_collide_with_templates() {
        let store = Path::new("/store");
        let a = staging_dir(store);
        let b = staging_dir(store);
        assert_ne!(a, b, "two builds get two staging dirs");
        assert!(a.starts_with(store));
        assert!(is_scratch(&a.file_name().unwrap().to_string_lossy()));
        assert!(is_scratch(".trash-0123abcd-17-00ff"));
        let id = Manifest {
            version: MANIFEST_VERSION,
            entries: vec![],
        }
        .id();
        for kept in [id.as_str(), ".build-", ".trash-", "build-1", "x.build-1"] {
            assert!(!is_scratch(kept), "{kept}");
        }
    }

    #[test]
    fn mounts_below_a_dir_deepest_first() {
        let info = "22 1 0:21 / /proc rw - proc proc rw\n\
                    90 22 0:50 / /s/.build-1/rootfs/proc rw - proc proc rw\n\
                    91 22 0:51 / /s/.build-1/rootfs/proc/sys/fs/binfmt_misc rw - x x rw\n\
                    92 22 0:52 / /s/.build-10/rootfs/sys rw - sysfs sysfs rw\n\
                    93 22 0:53 / /s/.build-1/my\\040dir rw - tmpfs t rw\n";
        assert_eq!(
            mounts_under(info, Path::new("/s/.build-1")),
            vec![
                PathBuf::from("/s/.build-1/rootfs/proc/sys/fs/binfmt_misc"),
                PathBuf::from("/s/.build-1/rootfs/proc"),
                PathBuf::from("/s/.build-1/my dir"),
            ]
        );
    }

    fn staged(store: &Path, file: &[u8]) -> PathBuf {
        let st = staging_dir(store);
        std::fs::create_dir_all(st.join("rootfs/etc")).unwrap();
        std::fs::write(st.join("rootfs/etc/f"), file).unwrap();
        st
    }

    fn meta() -> TemplateMeta {
        TemplateMeta {
            version: MANIFEST_VERSION,
            kind: TemplateKind::Busybox,
            init: vec!["/sbin/init".into()],
            stop_signal: libc::SIGUSR2,
            created_unix: 0,
            files: 0,
            bytes: 0,
        }
    }

    #[test]
    fn install_keeps_one_complete_template_per_id() {
        let d = tempfile::tempdir().unwrap();
        let store = d.path();
        let (id, m1) = install(store, &staged(store, b"x"), meta(), &mut |_, _, _| {}).unwrap();
        assert!(is_installed(&store.join(&id)));
        // The same tree again: the existing template stays, the new copy goes.
        let again = staged(store, b"x");
        let (id2, m2) = install(store, &again, meta(), &mut |_, _, _| {}).unwrap();
        assert_eq!((id2.as_str(), &m2), (id.as_str(), &m1));
        assert!(!again.exists());
        // A removal cut off halfway left part of the tree: not a template, replaced.
        std::fs::remove_file(store.join(&id).join("template.json")).unwrap();
        assert!(!is_installed(&store.join(&id)));
        let (id3, _) = install(store, &staged(store, b"x"), meta(), &mut |_, _, _| {}).unwrap();
        assert_eq!(id3, id);
        assert!(is_installed(&store.join(&id)));
        // Leftovers of killed builds and removals go; templates stay.
        let left = staged(store, b"y");
        let trash = store.join(".trash-abc-1-2");
        std::fs::create_dir_all(trash.join("rootfs")).unwrap();
        let mut removed = remove_scratch(store).unwrap();
        removed.sort();
        let mut want = vec![left, trash];
        want.sort();
        assert_eq!(removed, want);
        let names: Vec<_> = std::fs::read_dir(store)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from(&id)]);
        remove_template(store, &id).unwrap();
        remove_template(store, &id).unwrap();
        assert_eq!(std::fs::read_dir(store).unwrap().count(), 0);
    }
}
