//! Shared libraries fetched before the dynamic loader asks for them.
//!
//! Starting a program from a lazy image is a chain of misses the loader makes one after the
//! other: the kernel reads the executable, `ld.so` opens each library the executable names
//! (`DT_NEEDED`), then the libraries those name; Python loading `_ssl` opens `libssl` and
//! `libcrypto` the same way. Each miss costs a round trip, and no read-ahead in blob order sees
//! them coming: the libraries sit elsewhere in the layer (`/usr/lib/<triple>` sorts far from
//! `/usr/bin` and from Python's `lib-dynload`), often in another layer. The ELF file says which
//! they are, though. So when a read (or an open of a cached file) shows an ELF header, its
//! dynamic section is parsed and each library it needs is looked up as the loader would (its
//! default directories, in the image's layers from the top, through symlinks and whiteouts)
//! and fetched at once, while the loader is still busy with the file that named them: one
//! request per layer for all of them (several ranges in one request; parallel requests, each
//! on a fresh connection in TCP slow start, made a long fat link look slow to the read-ahead
//! estimate). A library fetched this way brings its first chunk (the headers the loader reads)
//! and its last (the data segment it relocates): the chunks its first accesses would fetch
//! anyway, so even a thin link carries nothing it would not have carried. The fetches count as
//! the layer's read-ahead: a library the loader then opens is a read-ahead hit.
//!
//! What is fetched never changes what is served: it is a guess, fetched and verified like any
//! chunk. Everything in the ELF comes from the image and is bounded: program headers, the
//! dynamic section, names, symlink hops, libraries per file and jobs running at once.

use std::io::{self, Read, Seek, SeekFrom};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};

use object::read::elf::{Dyn as _, FileHeader, ProgramHeader as _};
use object::read::{FileKind, ReadCache, ReadCacheOps, ReadRef};
use object::{elf, Endianness};

use super::inode::{NodeKind, ROOT_INO};
use super::reader::LayerReader;
use crate::untrusted;

/// Program headers an ELF file may have for its needs to be read (real ones have about a dozen).
const MAX_PROGRAM_HEADERS: u16 = 64;
/// Bytes of `PT_DYNAMIC` read (a few hundred in real files).
const MAX_DYNAMIC_BYTES: u64 = 64 << 10;
/// Bytes of `PT_INTERP` read (the loader's path).
const MAX_INTERP_BYTES: u64 = 4096;
/// Libraries taken from one file (real programs name a few dozen at most).
const MAX_NEEDED: usize = 64;
/// Longest library name taken.
const MAX_NAME: usize = 255;
/// Symlinks followed to find one library.
const MAX_SYMLINKS: u32 = 16;
/// Path components looked at to find one library.
const MAX_COMPONENTS: usize = 64;
/// Files followed and layers' libraries fetched at once, one thread each, all images together.
const MAX_JOBS: usize = 8;
/// Directory entries one followed file's libraries may look at (component by layer), all
/// names, directories and symlink hops together.
const MAX_LOOKUPS: u32 = 1 << 14;
/// How deep a chain of libraries is followed: the file read, the libraries it names, theirs.
const MAX_DEPTH: u32 = 2;
/// Bytes the parse of one file may read (headers, dynamic section, names).
const MAX_PARSE_BYTES: u64 = 256 << 10;

/// Why a file's needs could not be read.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DepsError {
    #[error("not an ELF file")]
    NotElf,
    #[error("malformed ELF file: {0}")]
    Malformed(String),
    #[error("ELF {what} too large ({size})")]
    TooLarge { what: &'static str, size: u64 },
}

impl From<object::read::Error> for DepsError {
    fn from(e: object::read::Error) -> Self {
        DepsError::Malformed(e.to_string())
    }
}

/// What an ELF file asks of the loader.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Needs {
    /// `e_machine`: which multiarch directories the loader searches.
    pub(crate) machine: u16,
    /// `PT_INTERP`: the loader itself (executables only).
    pub(crate) interp: Option<String>,
    /// `DT_NEEDED`, in order: library names, searched in the default directories.
    pub(crate) libs: Vec<String>,
}

/// Reads the needs of the ELF file `data`; only the bytes the headers point at are read.
pub(crate) fn needs<R: ReadCacheOps>(data: &ReadCache<R>) -> Result<Needs, DepsError> {
    match FileKind::parse(data) {
        Ok(FileKind::Elf32) => needs_of::<elf::FileHeader32<Endianness>, _>(data),
        Ok(FileKind::Elf64) => needs_of::<elf::FileHeader64<Endianness>, _>(data),
        _ => Err(DepsError::NotElf),
    }
}

fn needs_of<'d, Elf, R>(data: R) -> Result<Needs, DepsError>
where
    Elf: FileHeader<Endian = Endianness>,
    R: ReadRef<'d>,
{
    let header = Elf::parse(data)?;
    let e = header.endian()?;
    // Checked before anything is read: the sizes are the image's, and every read allocates.
    let phnum = header.e_phnum(e);
    if phnum > MAX_PROGRAM_HEADERS {
        return Err(DepsError::TooLarge {
            what: "program header count",
            size: phnum.into(),
        });
    }
    let mut loads = Vec::new();
    let mut dynamic = None;
    let mut interp = None;
    for ph in header.program_headers(e, data)? {
        let filesz: u64 = ph.p_filesz(e).into();
        let kind = ph.p_type(e);
        if kind == elf::PT_LOAD {
            loads.push((ph.p_vaddr(e).into(), ph.p_offset(e).into(), filesz));
        } else if kind == elf::PT_DYNAMIC {
            if filesz > MAX_DYNAMIC_BYTES {
                return Err(DepsError::TooLarge {
                    what: "dynamic section",
                    size: filesz,
                });
            }
            dynamic = ph.dynamic(e, data)?;
        } else if kind == elf::PT_INTERP && filesz <= MAX_INTERP_BYTES {
            interp = ph
                .interpreter(e, data)?
                .and_then(|p| std::str::from_utf8(p).ok())
                .map(str::to_owned);
        }
    }
    let mut needs = Needs {
        machine: header.e_machine(e).0,
        interp,
        libs: Vec::new(),
    };
    let Some(dynamic) = dynamic else {
        return Ok(needs);
    };
    let (mut strtab, mut strsz, mut names) = (None, 0u64, Vec::new());
    for d in dynamic {
        let tag = d.d_tag(e);
        let val: u64 = d.d_val(e).into();
        if tag == elf::DT_NULL {
            break;
        } else if tag == elf::DT_STRTAB {
            strtab = Some(val);
        } else if tag == elf::DT_STRSZ {
            strsz = val;
        } else if tag == elf::DT_NEEDED && names.len() < MAX_NEEDED {
            names.push(val);
        }
    }
    // DT_STRTAB is an address: the load segment holding it says where it is in the file.
    let Some(strtab) = strtab.and_then(|addr| {
        loads
            .iter()
            .find(|&&(vaddr, _, filesz)| addr >= vaddr && addr - vaddr < filesz)
            .map(|&(vaddr, offset, _)| offset.saturating_add(addr - vaddr))
    }) else {
        return Ok(needs);
    };
    let end = strtab.saturating_add(strsz);
    for at in names {
        let start = strtab.saturating_add(at);
        if start >= end {
            continue;
        }
        let Ok(name) = data.read_bytes_at_until(start..end, 0) else {
            continue;
        };
        match std::str::from_utf8(name) {
            Ok(n) if !n.is_empty() && n.len() <= MAX_NAME => needs.libs.push(n.to_owned()),
            _ => {}
        }
    }
    Ok(needs)
}

/// The directories the loader searches by default for an ELF file of `machine`, as
/// root-relative paths: the multiarch ones of Debian and Ubuntu first, then the plain ones
/// (Fedora's `lib64`, Alpine's `lib`).
fn search_dirs(machine: u16) -> Vec<String> {
    let triple = match elf::Machine(machine) {
        elf::EM_X86_64 => Some("x86_64-linux-gnu"),
        elf::EM_AARCH64 => Some("aarch64-linux-gnu"),
        elf::EM_386 => Some("i386-linux-gnu"),
        elf::EM_ARM => Some("arm-linux-gnueabihf"),
        elf::EM_PPC64 => Some("powerpc64le-linux-gnu"),
        elf::EM_S390 => Some("s390x-linux-gnu"),
        elf::EM_RISCV => Some("riscv64-linux-gnu"),
        _ => None,
    };
    let mut dirs = Vec::new();
    if let Some(t) = triple {
        dirs.push(format!("lib/{t}"));
        dirs.push(format!("usr/lib/{t}"));
    }
    for d in ["lib64", "usr/lib64", "lib", "usr/lib", "usr/local/lib"] {
        dirs.push(d.to_owned());
    }
    dirs
}

/// The layers of one image that this daemon has mounted, bottom first (containerd prepares
/// them in that order), with the parents of each that other images mounted: where a library
/// named by a file of one layer is looked for.
pub(crate) struct Image {
    layers: Mutex<Vec<Weak<LayerReader>>>,
    /// Jobs running, shared by all images (see [`MAX_JOBS`]).
    jobs: Arc<AtomicUsize>,
}

impl Image {
    fn top_down(&self) -> Vec<Arc<LayerReader>> {
        let layers = self.layers.lock().unwrap_or_else(|e| e.into_inner());
        layers.iter().rev().filter_map(Weak::upgrade).collect()
    }

    /// Looks up the libraries the ELF file `ino` of `layer` needs (the file is `depth` links
    /// down a chain) and fetches them, one request per layer holding some, each on a thread
    /// of its own; then, up to [`MAX_DEPTH`], theirs. Runs on the caller's thread: one that no
    /// read waits for.
    pub(crate) fn follow(self: &Arc<Self>, layer: &Arc<LayerReader>, ino: u64, depth: u32) {
        let needs = {
            let file = ReadCache::new(LayerFile::new(layer, ino));
            needs(&file)
        };
        let needs = match needs {
            Ok(n) => n,
            Err(e) => {
                tracing::debug!(layer = %layer.digest(), ino, error = %untrusted::chain(&e), "not following the libraries of a file");
                return;
            }
        };
        let layers = self.top_down();
        let dirs = search_dirs(needs.machine);
        let mut lookups = MAX_LOOKUPS;
        let mut find = |path: &str| find(&layers, path, &mut lookups);
        let interp = needs
            .interp
            .iter()
            .map(|p| (p, find(p)))
            .collect::<Vec<_>>();
        let libs = needs.libs.iter().filter(|n| !n.contains('/')).map(|name| {
            let found = dirs.iter().find_map(|d| find(&format!("{d}/{name}")));
            (name, found)
        });
        let libs = libs.collect::<Vec<_>>();
        let depth = depth + 1;
        // The libraries to fetch or follow, by layer: one request for each layer's.
        let mut by_layer: Vec<(Arc<LayerReader>, Vec<u64>)> = Vec::new();
        for (name, found) in interp.into_iter().chain(libs) {
            let Some((lib, lib_ino)) = found else {
                continue;
            };
            let fetch = lib.needs_fetching(lib_ino);
            tracing::debug!(layer = %lib.digest(), library = %untrusted::clip(name), depth, fetch, "library needed");
            if !fetch && (depth >= MAX_DEPTH || lib.followed(lib_ino)) {
                continue;
            }
            match by_layer.iter_mut().find(|(l, _)| Arc::ptr_eq(l, &lib)) {
                Some((_, inos)) => inos.push(lib_ino),
                None => by_layer.push((lib, vec![lib_ino])),
            }
        }
        for (lib, inos) in by_layer {
            let started = self.spawn(move |image| {
                lib.fetch_needed(&inos);
                for ino in inos {
                    if depth < MAX_DEPTH && lib.mark_followed(ino) {
                        image.follow(&lib, ino, depth);
                    }
                }
            });
            if !started {
                break;
            }
        }
    }

    /// Follows the libraries of the ELF file `ino` of `layer` (which a read just found) on a
    /// thread of its own. Nothing happens when [`MAX_JOBS`] are running already.
    pub(crate) fn start(self: &Arc<Self>, layer: &Arc<LayerReader>, ino: u64) {
        let layer = layer.clone();
        self.spawn(move |image| image.follow(&layer, ino, 0));
    }

    /// Runs `job` on a thread of its own if one of the daemon's [`MAX_JOBS`] is free.
    fn spawn(self: &Arc<Self>, job: impl FnOnce(&Arc<Image>) + Send + 'static) -> bool {
        if self.jobs.fetch_add(1, Ordering::SeqCst) >= MAX_JOBS {
            self.jobs.fetch_sub(1, Ordering::SeqCst);
            return false;
        }
        let image = self.clone();
        let started = std::thread::Builder::new()
            .name("stargz-needed".into())
            .spawn(move || {
                let _job = Job(&image);
                job(&image);
            });
        match started {
            Ok(_) => true,
            Err(e) => {
                self.jobs.fetch_sub(1, Ordering::SeqCst);
                tracing::debug!(error = %e, "cannot start a thread to fetch a library");
                false
            }
        }
    }
}

/// One of the daemon's [`MAX_JOBS`]; given back on drop.
struct Job<'a>(&'a Image);

impl Drop for Job<'_> {
    fn drop(&mut self) {
        self.0.jobs.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Every image with a mounted layer, by reference.
#[derive(Default)]
pub(crate) struct Images {
    by_reference: Mutex<std::collections::HashMap<String, Weak<Image>>>,
    jobs: Arc<AtomicUsize>,
}

impl Images {
    /// Adds `layer` (the latest mount) to the image `reference` names, above the layers
    /// `below` it (nearest first: its snapshot's parents, which another image may have
    /// mounted first, as for a shared base image).
    pub(crate) fn join(
        &self,
        reference: &str,
        layer: &Arc<LayerReader>,
        below: &[Arc<LayerReader>],
    ) {
        let image = {
            let mut all = self.by_reference.lock().unwrap_or_else(|e| e.into_inner());
            all.retain(|_, i| i.strong_count() > 0);
            match all.get(reference).and_then(Weak::upgrade) {
                Some(i) => i,
                None => {
                    let i = Arc::new(Image {
                        layers: Mutex::new(Vec::new()),
                        jobs: self.jobs.clone(),
                    });
                    all.insert(reference.to_owned(), Arc::downgrade(&i));
                    i
                }
            }
        };
        {
            let mut layers = image.layers.lock().unwrap_or_else(|e| e.into_inner());
            layers.retain(|l| l.strong_count() > 0);
            for b in below.iter().rev() {
                if !layers
                    .iter()
                    .any(|l| std::ptr::eq(l.as_ptr(), Arc::as_ptr(b)))
                {
                    layers.push(Arc::downgrade(b));
                }
            }
            layers.push(Arc::downgrade(layer));
        }
        layer.join_image(image);
    }
}

/// Finds the regular file at root-relative `path` as an overlay of `layers` (top first) shows
/// it: the topmost layer with an entry at each step decides (a whiteout hides the rest), and a
/// symlink on the way is resolved and looked up again from the top. Opaque directories are not
/// honoured: a guess may name a file an upper layer hides, which costs bytes, never content.
/// Each directory entry looked up (a component in a layer) takes one of `lookups`; none left:
/// not found.
pub(crate) fn find(
    layers: &[Arc<LayerReader>],
    path: &str,
    lookups: &mut u32,
) -> Option<(Arc<LayerReader>, u64)> {
    let mut comps = normalize(Vec::new(), path)?;
    for _ in 0..=MAX_SYMLINKS {
        // Where each layer is on the way down (None: it has no directory there).
        let mut at: Vec<Option<u64>> = vec![Some(ROOT_INO); layers.len()];
        let mut next = None;
        for (i, name) in comps.iter().enumerate() {
            let mut top = None;
            for (k, layer) in layers.iter().enumerate() {
                let node = at[k].and_then(|dir| {
                    *lookups = lookups.checked_sub(1)?;
                    layer.table().lookup(dir, name)
                });
                at[k] = node.filter(|n| n.kind == NodeKind::Dir).map(|n| n.ino);
                if top.is_none() {
                    top = node.map(|n| (k, n));
                }
            }
            let (k, node) = top?;
            match node.kind {
                NodeKind::Dir if i + 1 < comps.len() => {}
                NodeKind::Reg if i + 1 == comps.len() => {
                    return Some((layers[k].clone(), node.ino));
                }
                NodeKind::Symlink => {
                    let target = layers[k].table().link_name(node);
                    let base = match target.starts_with('/') {
                        true => Vec::new(),
                        false => comps[..i].to_vec(),
                    };
                    let mut resolved = normalize(base, target)?;
                    resolved.extend_from_slice(&comps[i + 1..]);
                    next = Some(resolved);
                    break;
                }
                _ => return None,
            }
        }
        comps = next?;
        if comps.len() > MAX_COMPONENTS {
            return None;
        }
    }
    None
}

/// `base` followed by `path`'s components, `.` and `..` resolved (`..` stops at the root).
fn normalize(mut base: Vec<String>, path: &str) -> Option<Vec<String>> {
    for c in path.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                base.pop();
            }
            c => base.push(c.to_owned()),
        }
        if base.len() > MAX_COMPONENTS {
            return None;
        }
    }
    Some(base)
}

/// A file of a layer as `Read + Seek`, through the layer's reads (which fetch what is missing),
/// for [`needs`]: at most [`MAX_PARSE_BYTES`] are read.
struct LayerFile<'a> {
    layer: &'a Arc<LayerReader>,
    ino: u64,
    size: u64,
    pos: u64,
    left: u64,
}

impl<'a> LayerFile<'a> {
    fn new(layer: &'a Arc<LayerReader>, ino: u64) -> Self {
        let size = layer.table().get(ino).map_or(0, |n| n.size);
        LayerFile {
            layer,
            ino,
            size,
            pos: 0,
            left: MAX_PARSE_BYTES,
        }
    }
}

impl Read for LayerFile<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let want = u64::try_from(buf.len())
            .unwrap_or(u64::MAX)
            .min(self.size.saturating_sub(self.pos))
            .min(64 << 10);
        if want == 0 {
            return Ok(0);
        }
        if want > self.left {
            return Err(io::Error::other("ELF headers read past their limit"));
        }
        let data = self
            .layer
            .read_for_daemon(self.ino, self.pos, want as u32)
            .map_err(io::Error::other)?;
        let n = data.len().min(buf.len());
        buf[..n].copy_from_slice(&data[..n]);
        self.pos += n as u64;
        self.left -= n as u64;
        Ok(n)
    }
}

impl Seek for LayerFile<'_> {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        let to = match pos {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::End(d) => self.size.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        self.pos = to.ok_or_else(|| io::Error::other("seek out of range"))?;
        Ok(self.pos)
    }
}

#[cfg(test)]
mod tests {
    use super::super::source::{FileSource, LayerSource};
    use super::*;

    fn needs_of_file(path: &str) -> Result<Needs, DepsError> {
        let f = std::fs::File::open(path).expect(path);
        needs(&ReadCache::new(f))
    }

    #[test]
    fn a_real_program_names_its_loader_and_libraries() {
        let n = needs_of_file("/bin/ls").expect("ls is ELF");
        assert!(n.libs.iter().any(|l| l == "libc.so.6"), "{n:?}");
        let interp = n.interp.as_deref().unwrap_or_default();
        assert!(interp.contains("ld-linux"), "{n:?}");
        let libc = std::fs::canonicalize("/lib/x86_64-linux-gnu/libc.so.6")
            .or_else(|_| std::fs::canonicalize("/lib/aarch64-linux-gnu/libc.so.6"));
        if let Ok(libc) = libc {
            let n = needs_of_file(libc.to_str().unwrap_or_default()).expect("libc");
            assert!(n.interp.is_none() || n.libs.iter().any(|l| l.starts_with("ld-")));
        }
        assert!(matches!(
            needs_of_file("/etc/passwd"),
            Err(DepsError::NotElf)
        ));
    }

    /// Bytes of a real program with some of its header fields overwritten.
    fn patched(at: usize, bytes: &[u8]) -> Vec<u8> {
        let mut elf = std::fs::read("/bin/ls").expect("ls");
        elf[at..at + bytes.len()].copy_from_slice(bytes);
        elf
    }

    #[test]
    fn hostile_headers_are_refused_without_reading_what_they_claim() {
        // e_phnum (offset 56 in ELF64) at its largest.
        let elf = patched(56, &0xfffeu16.to_le_bytes());
        let r = needs(&ReadCache::new(io::Cursor::new(elf)));
        assert!(matches!(r, Err(DepsError::TooLarge { .. })), "{r:?}");
        // Program headers said to lie past the end of the file.
        let elf = patched(32, &u64::MAX.to_le_bytes());
        assert!(needs(&ReadCache::new(io::Cursor::new(elf))).is_err());
        // Cut short.
        let elf = std::fs::read("/bin/ls").expect("ls")[..100].to_vec();
        assert!(needs(&ReadCache::new(io::Cursor::new(elf))).is_err());
        // Every byte of the first 4 KiB flipped in turn: an answer or an error, never a panic.
        let base = std::fs::read("/bin/ls").expect("ls");
        for at in 0..4096.min(base.len()) {
            let mut elf = base.clone();
            elf[at] ^= 0xff;
            let _ = needs(&ReadCache::new(io::Cursor::new(elf)));
        }
    }

    #[test]
    fn paths_normalize_within_the_root() {
        let n = |b: &[&str], p| {
            normalize(b.iter().map(|s| s.to_string()).collect(), p).map(|v| v.join("/"))
        };
        assert_eq!(
            n(&["usr", "lib"], "../../../lib/x.so").as_deref(),
            Some("lib/x.so")
        );
        assert_eq!(n(&[], "/lib//./y").as_deref(), Some("lib/y"));
        assert_eq!(n(&["usr"], "lib/../bin").as_deref(), Some("usr/bin"));
        assert_eq!(n(&[], &"a/".repeat(100)), None, "too deep");
    }

    #[test]
    fn search_dirs_start_with_the_multiarch_ones() {
        let d = search_dirs(elf::EM_X86_64.0);
        assert_eq!(d[..2], ["lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu"]);
        assert!(search_dirs(0).iter().all(|d| !d.contains("linux-gnu")));
    }

    /// An entry of a test layer.
    enum E<'a> {
        Dir(&'a str),
        File(&'a str, Vec<u8>),
        Link(&'a str, &'a str),
    }

    /// Bytes nobody compresses, `n` of them.
    fn noise(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    /// A blob file that counts the requests made of it after the layer opened.
    struct Counted {
        file: FileSource,
        requests: AtomicUsize,
    }

    impl LayerSource for Counted {
        fn size(&self) -> u64 {
            self.file.size()
        }
        fn fetch(
            &self,
            offset: u64,
            len: u64,
            sink: &mut (dyn io::Write + Send),
        ) -> io::Result<()> {
            self.requests.fetch_add(1, Ordering::SeqCst);
            self.file.fetch(offset, len, sink)
        }
        fn fetch_ranges(
            &self,
            ranges: &[std::ops::Range<u64>],
            sink: &mut (dyn io::Write + Send),
        ) -> io::Result<()> {
            self.requests.fetch_add(1, Ordering::SeqCst);
            for r in ranges {
                self.file.fetch(r.start, r.end - r.start, sink)?;
            }
            Ok(())
        }
        fn multi_range(&self) -> bool {
            true
        }
    }

    /// An eStargz layer of `entries` in 64 KiB chunks, opened (no FUSE) from a file under
    /// `dir` with read-ahead off: every chunk it has cached was asked for. Also returns its
    /// blob, which counts requests from the layer's opening on.
    fn layer(name: &str, entries: &[E], dir: &std::path::Path) -> (Arc<LayerReader>, Arc<Counted>) {
        let mut tar = tar::Builder::new(Vec::new());
        for e in entries {
            let mut h = tar::Header::new_gnu();
            match e {
                E::Dir(p) => {
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_mode(0o755);
                    h.set_size(0);
                    tar.append_data(&mut h, p, io::empty()).expect("dir");
                }
                E::File(p, data) => {
                    h.set_mode(0o755);
                    h.set_size(data.len() as u64);
                    tar.append_data(&mut h, p, &data[..]).expect("file");
                }
                E::Link(p, target) => {
                    h.set_entry_type(tar::EntryType::Symlink);
                    h.set_mode(0o777);
                    h.set_size(0);
                    tar.append_link(&mut h, p, target).expect("symlink");
                }
            }
        }
        let input = tar.into_inner().expect("tar");
        let mut blob = Vec::new();
        let opts = crate::estargz::builder::BuildOptions {
            chunk_size: 64 << 10,
            ..Default::default()
        };
        let built = crate::estargz::build(&input[..], &mut blob, &opts).expect("build");
        let path = dir.join(name);
        std::fs::write(&path, &blob).expect("blob");
        let blob = Arc::new(Counted {
            file: FileSource::open(&path).expect("open"),
            requests: AtomicUsize::new(0),
        });
        let spec = super::super::layer::LayerSpec {
            digest: format!("sha256:{name}"),
            source: blob.clone(),
            toc_digest: Some(built.toc_digest),
        };
        let opts = super::super::reader::ReadOptions {
            readahead_bytes: Some(0),
            ..Default::default()
        };
        let layer = super::super::layer::open_layer(
            spec,
            &dir.join(format!("{name}.cache")),
            &opts,
            Arc::default(),
        )
        .expect("open layer");
        blob.requests.store(0, Ordering::SeqCst);
        (layer, blob)
    }

    fn ino(layer: &LayerReader, path: &str) -> u64 {
        path.split('/').fold(ROOT_INO, |dir, name| {
            layer.table().lookup(dir, name).expect(path).ino
        })
    }

    /// Which of `files` (layer, path) are cached, polled until `want` or 10 s.
    fn cached_within(files: &[(&Arc<LayerReader>, &str)], want: &[bool]) -> Vec<bool> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let got: Vec<bool> = files
                .iter()
                .map(|(l, p)| l.file_cached(ino(l, p)))
                .collect();
            if got == want || std::time::Instant::now() > deadline {
                return got;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    /// Reading the start of a program fetches, without any read of them, the libraries and
    /// the loader it names, found as the loader finds them: through the usrmerge symlinks and
    /// the loader's absolute symlink, across layers, the top layer's copy winning; a big
    /// library brings its first and last chunks only; nothing else is fetched, and a layer's
    /// libraries come in one request.
    #[test]
    fn reading_a_program_fetches_the_libraries_it_needs() {
        let ls = std::fs::read("/bin/ls").expect("ls");
        let n = needs_of_file("/bin/ls").expect("ls");
        assert_eq!(
            n.machine,
            elf::EM_X86_64.0,
            "this test is written for x86_64"
        );
        assert!(n.libs.contains(&"libselinux.so.1".to_owned()), "{n:?}");
        let lib = "usr/lib/x86_64-linux-gnu";
        let dir = tempfile::tempdir().expect("tempdir");
        let (bottom, bottom_blob) = layer(
            "bottom",
            &[
                E::Dir("usr"),
                E::Dir("usr/lib"),
                E::Dir(lib),
                E::Dir("usr/lib64"),
                E::Link("lib", "usr/lib"),
                E::Link("lib64", "usr/lib64"),
                E::Link(
                    "usr/lib64/ld-linux-x86-64.so.2",
                    "/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
                ),
                E::File(&format!("{lib}/ld-linux-x86-64.so.2"), noise(3000, 1)),
                E::Link(&format!("{lib}/libc.so.6"), "libc-2.36.so"),
                // Three chunks: the middle one stays behind.
                E::File(&format!("{lib}/libc-2.36.so"), noise(150_000, 2)),
                E::File(&format!("{lib}/libselinux.so.1"), noise(3000, 3)),
                E::File(&format!("{lib}/libunrelated.so.1"), noise(3000, 4)),
            ],
            dir.path(),
        );
        let (top, _) = layer(
            "top",
            &[
                E::Dir("usr"),
                E::Dir("usr/bin"),
                E::Dir("usr/lib"),
                E::Dir(lib),
                E::File("usr/bin/prog", ls),
                E::File(&format!("{lib}/libselinux.so.1"), noise(3000, 5)),
            ],
            dir.path(),
        );
        // The bottom layer was mounted for another image (a shared base): the top layer's
        // image knows it as its parent.
        let images = Images::default();
        images.join("registry.test/base:1", &bottom, &[]);
        images.join("registry.test/app:1", &top, std::slice::from_ref(&bottom));
        let files = [
            (&bottom, "usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"),
            (&bottom, "usr/lib/x86_64-linux-gnu/libc-2.36.so"),
            (&top, "usr/lib/x86_64-linux-gnu/libselinux.so.1"),
            (&bottom, "usr/lib/x86_64-linux-gnu/libselinux.so.1"),
            (&bottom, "usr/lib/x86_64-linux-gnu/libunrelated.so.1"),
        ];
        let none = [false; 5];
        assert_eq!(
            cached_within(&files, &none),
            none,
            "nothing before the read"
        );
        let prog = ino(&top, "usr/bin/prog");
        let head = top.read(prog, 0, 4096).expect("read");
        assert!(head.starts_with(b"\x7fELF"));
        // libc is not "cached" as a whole: its middle chunk is not fetched.
        let want = [true, false, true, false, false];
        assert_eq!(cached_within(&files, &want), want);
        let libc = top_chunks(&bottom, "usr/lib/x86_64-linux-gnu/libc-2.36.so");
        assert_eq!(libc, [true, false, true], "first and last chunks of libc");
        assert_eq!(
            bottom_blob.requests.load(Ordering::SeqCst),
            1,
            "the bottom layer's libraries come in one request"
        );
        // Once only: the file is not followed again.
        assert!(top.followed(prog) && !top.mark_followed(prog));
    }

    /// Which chunks of `path` in `layer` are present.
    fn top_chunks(layer: &LayerReader, path: &str) -> Vec<bool> {
        let i = ino(layer, path);
        let node = layer.table().get(i).expect("node");
        layer
            .table()
            .chunks(node)
            .iter()
            .map(|c| layer.range_cached(i, c.info.file_range().start, 1))
            .collect()
    }

    #[test]
    fn lookups_follow_the_overlay_and_are_bounded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (bottom, _) = layer(
            "bottom",
            &[
                E::Dir("a"),
                E::File("a/gone.so", noise(10, 1)),
                E::File("a/kept.so", noise(10, 2)),
                E::Link("loop1", "loop2"),
                E::Link("loop2", "/loop1"),
                E::Link("up", "../../../a/kept.so"),
            ],
            dir.path(),
        );
        let (top, _) = layer(
            "top",
            &[E::Dir("a"), E::File("a/.wh.gone.so", Vec::new())],
            dir.path(),
        );
        let layers = [top.clone(), bottom.clone()];
        let found = |p: &str| find(&layers, p, &mut 1000).map(|(l, i)| (l.digest().to_owned(), i));
        assert_eq!(found("a/gone.so"), None, "whited out above");
        assert_eq!(
            found("a/kept.so"),
            Some(("sha256:bottom".into(), ino(&bottom, "a/kept.so")))
        );
        assert_eq!(found("/up").map(|f| f.1), Some(ino(&bottom, "a/kept.so")));
        assert_eq!(found("loop1"), None, "a symlink loop ends");
        assert_eq!(found("a"), None, "a directory is no library");
        assert_eq!(found("a/kept.so/x"), None);
        // Two layers, two components: four lookups, and not one more.
        assert!(find(&layers, "a/kept.so", &mut 4).is_some());
        assert!(
            find(&layers, "a/kept.so", &mut 3).is_none(),
            "out of lookups"
        );
    }
}
