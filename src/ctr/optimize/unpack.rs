//! Unpacking the layers of the image to optimize, one directory each, the way containerd's
//! overlayfs applier lays them out, and indexing their tar entry names on the way.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use super::OptimizeError;
use crate::ctr::client::Containerd;
use crate::ctr::recorder::{clean_entry_name, MAX_INDEX_ENTRIES};
use crate::ctr::Error;
use crate::oci::Descriptor;
use crate::untrusted::clip;

/// Spools each layer from the content store and unpacks it into `work/l/<i>`; returns the
/// per-layer indexes of entry names.
pub(super) async fn unpack_layers(
    cd: &Containerd,
    layers: &[Descriptor],
    work: &Path,
    progress: &mut (dyn Write + Send),
) -> Result<Vec<HashSet<String>>, Error> {
    let mut index = Vec::with_capacity(layers.len());
    for (i, layer) in layers.iter().enumerate() {
        writeln!(
            progress,
            "unpacking layer {}/{} {}",
            i + 1,
            layers.len(),
            layer.digest
        )?;
        let spool = tempfile::tempfile_in(work)?;
        let mut f = tokio::fs::File::from_std(spool.try_clone()?);
        cd.read_to_file(&layer.digest, &mut f).await?;
        let dir = work.join("l").join(i.to_string());
        std::fs::create_dir_all(&dir)?;
        let digest = layer.digest.clone();
        let budget = MAX_INDEX_ENTRIES.saturating_sub(index.iter().map(HashSet::len).sum());
        let names = tokio::task::spawn_blocking(move || unpack_layer(spool, &dir, i, budget))
            .await
            .map_err(|e| Error::Incomplete(format!("unpack task: {e}")))?
            .map_err(|e| match e {
                UnpackFailure::Io(source) => OptimizeError::Unpack {
                    index: i,
                    digest: clip(&digest),
                    source,
                },
                UnpackFailure::Other(e) => e,
            })?;
        index.push(names);
    }
    Ok(index)
}

enum UnpackFailure {
    Io(std::io::Error),
    Other(OptimizeError),
}

impl From<std::io::Error> for UnpackFailure {
    fn from(e: std::io::Error) -> Self {
        Self::Io(e)
    }
}

/// Unpacks one (gzip, zstd or plain) layer tar into `dir`, as containerd's overlayfs applier lays it
/// out; returns the set of its cleaned entry names.
fn unpack_layer(
    mut spool: std::fs::File,
    dir: &Path,
    index: usize,
    budget: usize,
) -> Result<HashSet<String>, UnpackFailure> {
    use std::io::Seek;
    spool.rewind()?;
    let mut magic = [0u8; 4];
    let n = spool.read(&mut magic)?;
    spool.rewind()?;
    let input = std::io::BufReader::with_capacity(1 << 20, spool);
    let reader: Box<dyn Read> = if n >= 2 && magic[..2] == [0x1f, 0x8b] {
        Box::new(flate2::read::MultiGzDecoder::new(input))
    } else if n == 4 && magic == crate::estargz::chunk::ZSTD_MAGIC {
        // zstd, zstd:chunked included (its TOC and footer frames are skippable).
        Box::new(crate::estargz::chunk::zstd_reader(input)?)
    } else {
        Box::new(input)
    };
    let root = dir.canonicalize()?;
    let mut archive = tar::Archive::new(reader);
    archive.set_preserve_permissions(true);
    archive.set_preserve_ownerships(true);
    archive.set_preserve_mtime(true);
    archive.set_overwrite(true);
    let mut names = HashSet::new();
    for entry in archive.entries()? {
        let mut entry = entry?;
        let raw = entry.path_bytes().into_owned();
        let Ok(raw) = String::from_utf8(raw) else {
            tracing::warn!(
                layer = index,
                "skipping a tar entry whose name is not UTF-8"
            );
            continue;
        };
        let name = clean_entry_name(&raw);
        if name.is_empty() {
            continue;
        }
        if names.len() >= budget {
            return Err(UnpackFailure::Other(OptimizeError::LayerTooBig(index)));
        }
        let (parent, base) = match name.rsplit_once('/') {
            Some((p, b)) => (p.to_string(), b.to_string()),
            None => (String::new(), name.clone()),
        };
        names.insert(name.clone());
        if base == ".wh..wh..opq" {
            let p = inside(&root, &parent)?;
            crate::xattr::set(&p, crate::fs::inode::OPAQUE_XATTR, b"y")?;
        } else if let Some(hidden) = base.strip_prefix(".wh.") {
            let p = inside(&root, &parent)?;
            let target = p.join(hidden);
            if let Ok(m) = target.symlink_metadata() {
                if m.is_dir() {
                    std::fs::remove_dir_all(&target)?;
                } else {
                    std::fs::remove_file(&target)?;
                }
            }
            nix::sys::stat::mknod(
                &target,
                nix::sys::stat::SFlag::S_IFCHR,
                nix::sys::stat::Mode::empty(),
                0,
            )
            .map_err(std::io::Error::from)?;
        } else if !entry.unpack_in(&root)? {
            tracing::warn!(layer = index, name = %clip(&name), "skipping a tar entry outside the layer");
        }
    }
    Ok(names)
}

/// `root/rel`, creating missing directories, after checking that no component is a symlink:
/// a symlink in the layer must not lead a whiteout outside `root`.
fn inside(root: &Path, rel: &str) -> std::io::Result<PathBuf> {
    let mut p = root.to_path_buf();
    for c in rel.split('/').filter(|c| !c.is_empty()) {
        p.push(c);
        match p.symlink_metadata() {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("whiteout under the symlink {}", clip(rel)),
                ))
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => std::fs::create_dir(&p)?,
            Err(e) => return Err(e),
        }
    }
    Ok(p)
}
