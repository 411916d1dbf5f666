//! Export and import of a volume as a tar stream: a description (`vessel-export.json`)
//! followed by the VE's own changes as a layer over its template, in the convention of
//! OCI image layers: `rootfs/<path>` entries for what the VE added or changed, `.wh.<name>`
//! for what it deleted, `.wh..wh..opq` in a directory that hides the template's. Owners are
//! VE-relative; extended attributes travel as PAX `SCHILY.xattr.*` records; hard links as
//! tar links; files with holes in GNU's PAX sparse format 1.0 (GNU tar reads them).
//!
//! An archive is untrusted input: import applies the rules a process inside the VE is
//! held to (owners in the VE's range, capabilities rooted in the VE, no devices, no path
//! leaving the tree), through the same code as the FUSE path where there is one
//! ([`crate::xattr`]). Read an untrusted stream through a [`Guard`].

mod export;
mod guard;
mod import;
mod pax_sparse;
#[cfg(test)]
pub(crate) mod tests;

pub use export::{export, Snapshot};
pub use guard::Guard;
pub use import::import;

use std::io::Read;

pub const META_NAME: &str = "vessel-export.json";
const WH: &str = ".wh.";
const OPAQUE: &str = ".wh..wh..opq";
const ROOTFS: &[u8] = b"rootfs";

fn bad(msg: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg)
}

/// Read the description at the start of an export stream.
pub fn read_meta<R: Read>(ar: &mut tar::Archive<R>) -> std::io::Result<(Vec<u8>, tar::Entries<'_, R>)> {
    let mut entries = ar.entries()?;
    let mut first = entries
        .next()
        .ok_or_else(|| bad("empty archive: not a `vessel ve export` stream".into()))??;
    if first.path_bytes().as_ref() != META_NAME.as_bytes() {
        return Err(bad(format!(
            "the archive does not start with {META_NAME}: not a `vessel ve export` stream"
        )));
    }
    let mut meta = Vec::new();
    first.by_ref().take(1 << 20).read_to_end(&mut meta)?;
    Ok((meta, entries))
}
