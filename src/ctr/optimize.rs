//! `image optimize`: run an image's workload once, record which files it opens, and convert
//! the image to eStargz with those files first in each layer (then `.prefetch.landmark`), so
//! a lazy pull fetches them in one request per layer at mount time.
//!
//! # How accesses are observed, and why this way
//! - Each layer is unpacked into its own directory of a temp dir (whiteouts turned into
//!   overlayfs' char 0/0 files and `trusted.overlay.opaque` directories), and the per-layer
//!   index of tar entry names is built in the same pass. We mount overlayfs over them
//!   ourselves rather than going through a containerd snapshotter: nothing is left in
//!   containerd, everything lives in one temp dir that a drop removes, and no shim is needed.
//! - The workload runs under `runc` on a bundle we generate (containerd's default spec: new
//!   pid/ipc/uts/mount/network namespaces, the network one with no interface but `lo`, as
//!   Go's default without `--cni`/`--net-host`). `runc create` runs first, then the fanotify
//!   mark is placed, then `runc start`: what runc itself reads while creating (e.g.
//!   `/etc/passwd`) is not recorded, as in Go, whose fanotifier starts after the task is created.
//! - fanotify marks the overlay's *filesystem* (`FAN_MARK_FILESYSTEM`), so every mount of it —
//!   including the bind mount runc pivots into — reports; `FAN_OPEN | FAN_OPEN_EXEC` catch
//!   `open`, `execve` and the dynamic loader, and a library that is `mmap`ed was opened first.
//!   Go also asks for `FAN_ACCESS`, which repeats the same paths on every read; we leave it out.
//! - The path of each event's fd is what the kernel reports: relative to the container's root,
//!   symlinks already followed, a hardlink under the name it was opened by — the same paths Go's
//!   fanotifier reads, so [`super::recorder`] attributes them to layers as Go does.
//!
//! - Why not FUSE in a recording mode (serving the layers through our own file system and
//!   logging lookups/opens): it would need the daemon's code in the client, see only what FUSE
//!   is asked (the kernel's caches hide repeats, which is fine, but an `mmap`ed page fault
//!   without a prior FUSE open cannot happen either way), and cost a FUSE round trip per
//!   access for the whole run. fanotify gives the same information from the kernel with an
//!   unmodified overlayfs, which is also what the container will really run on.
//! - The layer blobs come from containerd's content store (fetched from the registry first
//!   when a lazy pull left them out), so the unpack and the conversion read the same bytes.
//!
//! # Clean-up
//! The container (`runc delete --force`), the overlay mount and the temp dir are guards dropped
//! on every return, and the command wraps this future in a SIGINT/SIGTERM select, so a signal
//! drops it and runs the same guards.

use std::collections::HashSet;
use std::ffi::CString;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tonic::Code;

use super::client::{from_pb, Containerd};
use super::convert::{convert, ConvertOptions};
use super::recorder::{clean_entry_name, ImageRecorder, MAX_INDEX_ENTRIES};
use super::registry::{Fetcher, RegistryOptions, RemoteFetcher};
use super::rpull::{rpull, RpullOptions};
use super::toc::layer_toc;
use super::Error;
use crate::labels::TOC_DIGEST;
use crate::oci::{host_platform, is_index_type, is_layer_type, Descriptor, Index, Manifest};
use crate::remote::Reference;
use crate::untrusted::clip;

/// Go's default monitoring period; `--period 0` means it too, as in Go.
pub(crate) const DEFAULT_PERIOD: Duration = Duration::from_secs(10);
/// overlayfs' `lowerdir` must fit in one page with our short paths; 128 layers is Docker's limit.
const MAX_LAYERS: usize = 128;
/// How long a killed workload may take to be reaped before we give up waiting.
const KILL_GRACE: Duration = Duration::from_secs(10);

/// Errors of `image optimize` beyond those of pull and convert.
#[derive(Debug, thiserror::Error)]
pub enum OptimizeError {
    #[error("image {0} has no entrypoint or cmd to run; give one with --entrypoint and/or --args")]
    NoWorkload(String),
    #[error("image {image} is for {os}/{arch}; this host runs {host}")]
    Platform {
        image: String,
        os: String,
        arch: String,
        host: String,
    },
    #[error("image has {0} layers; at most {MAX_LAYERS} are supported")]
    TooManyLayers(usize),
    #[error("invalid {flag}: {reason}")]
    Flag { flag: &'static str, reason: String },
    #[error("unpacking layer {index} ({digest})")]
    Unpack {
        index: usize,
        digest: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the image has more than {MAX_INDEX_ENTRIES} tar entries (at layer {0})")]
    LayerTooBig(usize),
    #[error("layer {index}: {reason}")]
    LayerFormat { index: usize, reason: String },
    #[error("mounting the image's overlay at {target}")]
    Mount {
        target: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("user {0} not found in the image's /etc/passwd or /etc/group")]
    User(String),
    #[error("runc {op} failed: {detail}")]
    Runc { op: &'static str, detail: String },
    #[error("fanotify {op}")]
    Fanotify {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("image {image} not found in containerd, and pulling it failed")]
    Pull {
        image: String,
        #[source]
        source: Box<Error>,
    },
    #[error("interrupted by {0}; container, mount and temp files removed")]
    Interrupted(&'static str),
}

/// Options of `image optimize` (Go's flag names).
#[derive(Debug, Clone)]
pub(crate) struct OptimizeOptions {
    pub oci: bool,
    /// How long the workload may run before it is killed and the record closed.
    pub period: Duration,
    pub entrypoint: Option<Vec<String>>,
    pub args: Option<Vec<String>>,
    /// `KEY=VALUE`, added to or replacing the image's environment.
    pub env: Vec<String>,
    pub cwd: Option<String>,
    pub user: Option<String>,
    pub record_out: Option<PathBuf>,
    pub compression_level: u32,
    pub chunk_size: u64,
    /// For pulling the source when it is not in containerd yet.
    pub registry: RegistryOptions,
    /// `--no-optimize`: convert without running anything.
    pub no_optimize: bool,
    /// `--reuse`: keep eStargz layers (TOC digest verified) that the workload did not read.
    pub reuse: bool,
    /// `-i`: the workload reads our stdin (else /dev/null).
    pub stdin: bool,
    pub net: NetOptions,
    /// `--mount` (Go's `type=…,source=…,destination=…,options=a:b`), already parsed.
    pub mounts: Vec<serde_json::Value>,
    /// `--wait-on-signal`: no period; the workload runs until the first SIGINT, which the
    /// command forwards here instead of aborting.
    pub wait_on_signal: Option<Arc<WorkloadStop>>,
}

/// How the command tells a `--wait-on-signal` run that SIGINT came: while `waiting` is set, a
/// SIGINT stops the workload (and the optimization goes on) instead of aborting everything.
#[derive(Debug, Default)]
pub(crate) struct WorkloadStop {
    pub waiting: AtomicBool,
    pub notify: tokio::sync::Notify,
}

/// The container's network: its own namespace with only `lo` (Go's default) or the host's.
#[derive(Debug, Clone, Default)]
pub(crate) struct NetOptions {
    pub host: bool,
    pub nameservers: Vec<String>,
    pub search: Vec<String>,
    pub options: Vec<String>,
    /// `host:IP`
    pub extra_hosts: Vec<String>,
}

/// Optimizes image `src` into `dst`; returns the new manifest descriptor.
pub(crate) async fn optimize(
    cd: &Containerd,
    src: &str,
    dst: &str,
    opts: &OptimizeOptions,
    progress: &mut (dyn Write + Send),
) -> Result<Descriptor, Error> {
    ensure_image(cd, src, opts, progress).await?;
    let (manifest_desc, manifest, config) = resolve(cd, src).await?;
    ensure_blobs(cd, src, &manifest.layers, opts, progress).await?;
    if opts.no_optimize {
        writeln!(
            progress,
            "converting {} layers to eStargz without optimization",
            manifest.layers.len()
        )?;
        let copts = ConvertOptions {
            oci: opts.oci,
            compression_level: opts.compression_level,
            chunk_size: opts.chunk_size,
            record_in: None,
            tmp_dir: None,
            keep_layers: vec![],
        };
        return convert(cd, src, dst, &copts, progress).await;
    }
    let process = Process::from_config(src, &config, opts)?;
    // Fail before the workload runs, not after, if the record cannot be written.
    if let Some(out) = &opts.record_out {
        std::fs::File::create(out).map_err(|e| {
            Error::InvalidArgument(format!(
                "--record-out {}: {e}",
                clip(&out.display().to_string())
            ))
        })?;
    }
    if manifest.layers.len() > MAX_LAYERS {
        return Err(OptimizeError::TooManyLayers(manifest.layers.len()).into());
    }

    // Dropped last: everything below lives in it.
    let work = tempfile::Builder::new()
        .prefix("ctr-remote-optimize-")
        .tempdir()?;
    let index = unpack_layers(cd, &manifest.layers, work.path(), progress).await?;
    let recorder = ImageRecorder::new(&manifest_desc.digest, index);
    let recorder = run_and_record(
        work.path(),
        manifest.layers.len(),
        &process,
        recorder,
        opts,
        progress,
    )
    .await?;
    // The unpacked layers are not needed for the conversion (it reads the blobs): free the
    // disk now rather than when the temp dir goes.
    for d in ["l", "upper", "work", "rootfs"] {
        if let Err(e) = std::fs::remove_dir_all(work.path().join(d)) {
            tracing::debug!(dir = d, error = %e, "removing unpacked layers");
        }
    }

    let record_path = work.path().join("record.json");
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&record_path)?);
        recorder.write_to(&mut f)?;
        f.flush()?;
    }
    let per_layer: Vec<String> = (0..manifest.layers.len())
        .map(|i| recorder.files_of_layer(i).to_string())
        .collect();
    writeln!(
        progress,
        "recorded {} files (per layer, bottom first: {})",
        recorder.entries().len(),
        per_layer.join(", ")
    )?;
    if let Some(out) = &opts.record_out {
        std::fs::copy(&record_path, out)?;
        writeln!(progress, "record written to {}", out.display())?;
    }

    let mut keep_layers = Vec::new();
    if opts.reuse {
        for (i, layer) in manifest.layers.iter().enumerate() {
            if recorder.files_of_layer(i) == 0 && reusable(cd, layer).await {
                keep_layers.push(i);
            }
        }
    }
    writeln!(
        progress,
        "converting {} layers to eStargz",
        manifest.layers.len() - keep_layers.len()
    )?;
    let copts = ConvertOptions {
        oci: opts.oci,
        compression_level: opts.compression_level,
        chunk_size: opts.chunk_size,
        record_in: Some(record_path),
        tmp_dir: Some(work.path().to_path_buf()),
        keep_layers,
    };
    convert(cd, src, dst, &copts, progress).await
}

/// Pulls `src` (content only matters here) when containerd does not have it yet.
async fn ensure_image(
    cd: &Containerd,
    src: &str,
    opts: &OptimizeOptions,
    progress: &mut (dyn Write + Send),
) -> Result<(), Error> {
    match cd.get_image(src).await {
        Ok(_) => return Ok(()),
        Err(Error::Grpc { status, .. }) if status.code() == Code::NotFound => {}
        Err(e) => return Err(e),
    }
    writeln!(progress, "pulling {src}")?;
    let pulled = async {
        let reference: Reference = src.parse()?;
        let fetcher = RemoteFetcher::new(reference.clone(), &opts.registry)?;
        let ropts = RpullOptions {
            snapshotter: "overlayfs".to_string(),
            skip_content_verify: false,
            prefetch_size: 0,
            image_labels: Default::default(),
        };
        let mut sink = std::io::sink();
        rpull(cd, &fetcher, src, &reference, &ropts, &mut sink, progress).await
    };
    match pulled.await {
        Ok(_) => Ok(()),
        Err(e) => Err(OptimizeError::Pull {
            image: clip(src),
            source: Box::new(e),
        }
        .into()),
    }
}

/// Go's `isReusableESGZLayer`: the layer says its TOC digest, and the TOC in the blob has it.
async fn reusable(cd: &Containerd, layer: &Descriptor) -> bool {
    let Some(want) = layer.annotations.get(TOC_DIGEST) else {
        return false;
    };
    match layer_toc(cd, &layer.digest).await {
        Ok(found) => &found.digest == want,
        Err(e) => {
            tracing::debug!(digest = %layer.digest, error = %crate::untrusted::chain(&e), "not reusable");
            false
        }
    }
}

/// Fetches the layer blobs containerd does not hold: an image pulled lazily (`rpull` through
/// the stargz snapshotter) has its manifest and config in the content store but not its
/// layers, and both the unpack and the conversion read them from there.
async fn ensure_blobs(
    cd: &Containerd,
    src: &str,
    layers: &[Descriptor],
    opts: &OptimizeOptions,
    progress: &mut (dyn Write + Send),
) -> Result<(), Error> {
    let mut fetcher = None;
    for (i, layer) in layers.iter().enumerate() {
        if cd.content_info(&layer.digest).await?.is_some() {
            continue;
        }
        writeln!(
            progress,
            "fetching layer {}/{} {} (not in the content store)",
            i + 1,
            layers.len(),
            layer.digest
        )?;
        if fetcher.is_none() {
            let reference: Reference = src.parse()?;
            fetcher = Some(RemoteFetcher::new(reference, &opts.registry)?);
        }
        let Some(f) = fetcher.as_ref() else {
            continue;
        };
        let stream = f.fetch_stream(layer).await?;
        cd.write_stream(layer, stream, &Default::default()).await?;
    }
    Ok(())
}

/// The manifest for this host's platform, and the image config, as Go's
/// `platforms.DefaultStrict()` picks them: an index entry for another platform is skipped, and a
/// lone manifest whose config names another platform is refused.
async fn resolve(
    cd: &Containerd,
    src: &str,
) -> Result<(Descriptor, Manifest, serde_json::Value), Error> {
    let image = cd.get_image(src).await?;
    let mut target = image
        .target
        .as_ref()
        .map(from_pb)
        .ok_or_else(|| Error::NotFound(format!("target of {src}")))?;
    let want = host_platform();
    if is_index_type(&target.media_type) {
        let index: Index = serde_json::from_slice(&cd.read_all(&target.digest).await?)?;
        target = index
            .manifests
            .into_iter()
            .find(|m| {
                m.platform
                    .as_ref()
                    .is_none_or(|p| p.os == want.os && p.architecture == want.architecture)
            })
            .ok_or_else(|| {
                Error::NotFound(format!(
                    "no {}/{} manifest in {src}",
                    want.os, want.architecture
                ))
            })?;
    }
    let manifest: Manifest = serde_json::from_slice(&cd.read_all(&target.digest).await?)?;
    let config: serde_json::Value =
        serde_json::from_slice(&cd.read_all(&manifest.config.digest).await?)?;
    let os = config["os"].as_str().unwrap_or("");
    let arch = config["architecture"].as_str().unwrap_or("");
    if (!os.is_empty() && os != want.os) || (!arch.is_empty() && arch != want.architecture) {
        return Err(OptimizeError::Platform {
            image: clip(src),
            os: clip(os),
            arch: clip(arch),
            host: format!("{}/{}", want.os, want.architecture),
        }
        .into());
    }
    for (i, l) in manifest.layers.iter().enumerate() {
        if !is_layer_type(&l.media_type) {
            return Err(Error::Unsupported(format!(
                "layer {i} has media type {}",
                clip(&l.media_type)
            )));
        }
    }
    Ok((target, manifest, config))
}

/// The container's process, from the image config and the overrides.
#[derive(Debug, Clone)]
struct Process {
    args: Vec<String>,
    env: Vec<String>,
    cwd: String,
    /// `user[:group]` as in the image config; resolved against the rootfs once mounted.
    user: String,
}

impl Process {
    /// Go's `withEntrypointArgs` and `WithImageConfig`: a non-empty `--entrypoint` replaces the
    /// image's entrypoint, a non-empty `--args` its cmd.
    fn from_config(
        src: &str,
        config: &serde_json::Value,
        opts: &OptimizeOptions,
    ) -> Result<Self, Error> {
        let c = &config["config"];
        let strings = |v: &serde_json::Value| -> Vec<String> {
            v.as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|s| s.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default()
        };
        let mut entrypoint = strings(&c["Entrypoint"]);
        if let Some(e) = opts.entrypoint.as_ref().filter(|e| !e.is_empty()) {
            entrypoint = e.clone();
        }
        let mut cmd = strings(&c["Cmd"]);
        if let Some(a) = opts.args.as_ref().filter(|a| !a.is_empty()) {
            cmd = a.clone();
        }
        let args: Vec<String> = entrypoint.into_iter().chain(cmd).collect();
        if args.is_empty() {
            return Err(OptimizeError::NoWorkload(clip(src)).into());
        }
        let mut env =
            vec!["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string()];
        for e in strings(&c["Env"])
            .into_iter()
            .chain(opts.env.iter().cloned())
        {
            set_env(&mut env, e);
        }
        let cwd = opts
            .cwd
            .clone()
            .or_else(|| c["WorkingDir"].as_str().map(str::to_string))
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "/".to_string());
        let user = opts
            .user
            .clone()
            .or_else(|| c["User"].as_str().map(str::to_string))
            .unwrap_or_default();
        Ok(Self {
            args,
            env,
            cwd,
            user,
        })
    }
}

/// Replaces `KEY=…` in `env`, or appends it (containerd's `replaceOrAppendEnvValues`).
fn set_env(env: &mut Vec<String>, kv: String) {
    let key = kv.split('=').next().unwrap_or("").to_string();
    match env
        .iter_mut()
        .find(|e| e.split('=').next() == Some(key.as_str()))
    {
        Some(slot) => *slot = kv,
        None => env.push(kv),
    }
}

// ---------------------------------------------------------------------------------------------
// Layers
// ---------------------------------------------------------------------------------------------

/// Spools each layer from the content store and unpacks it into `work/l/<i>`; returns the
/// per-layer indexes of entry names.
async fn unpack_layers(
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

/// Unpacks one (gzip or plain) layer tar into `dir`, as containerd's overlayfs applier lays it
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
    } else if n == 4 && magic == [0x28, 0xb5, 0x2f, 0xfd] {
        return Err(UnpackFailure::Other(OptimizeError::LayerFormat {
            index,
            reason: "zstd layers are not supported".into(),
        }));
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
            set_xattr(&p, "trusted.overlay.opaque", b"y")?;
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

fn cstring(p: &Path) -> std::io::Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))
}

fn set_xattr(path: &Path, name: &str, value: &[u8]) -> std::io::Result<()> {
    let p = cstring(path)?;
    let n =
        CString::new(name).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // SAFETY: both strings are NUL-terminated and outlive the call; value is a valid slice.
    let r = unsafe {
        libc::lsetxattr(
            p.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Mount, container, fanotify
// ---------------------------------------------------------------------------------------------

/// The overlay over the unpacked layers; detached on drop.
struct OverlayMount {
    target: PathBuf,
}

impl OverlayMount {
    fn mount(work: &Path, layers: usize) -> Result<Self, Error> {
        let target = work.join("rootfs");
        let upper = work.join("upper");
        let wd = work.join("work");
        for d in [&target, &upper, &wd] {
            std::fs::create_dir_all(d)?;
        }
        let lower: Vec<String> = (0..layers)
            .rev()
            .map(|i| work.join("l").join(i.to_string()).display().to_string())
            .collect();
        let data = format!(
            "lowerdir={},upperdir={},workdir={}",
            lower.join(":"),
            upper.display(),
            wd.display()
        );
        nix::mount::mount(
            Some("overlay"),
            &target,
            Some("overlay"),
            nix::mount::MsFlags::empty(),
            Some(data.as_str()),
        )
        .map_err(|source| OptimizeError::Mount {
            target: target.clone(),
            source,
        })?;
        Ok(Self { target })
    }
}

impl Drop for OverlayMount {
    fn drop(&mut self) {
        if let Err(e) = nix::mount::umount2(&self.target, nix::mount::MntFlags::MNT_DETACH) {
            tracing::warn!(target = %self.target.display(), error = %e, "failed to unmount the optimize rootfs");
        }
    }
}

/// A runc container under our own runc root; force-deleted on drop (which kills it).
struct Container {
    runc_root: PathBuf,
    id: String,
}

impl Container {
    fn runc(&self) -> std::process::Command {
        let mut c = std::process::Command::new("runc");
        c.arg("--root").arg(&self.runc_root);
        c
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let out = self
            .runc()
            .args(["delete", "--force", &self.id])
            .stdin(std::process::Stdio::null())
            .output();
        match out {
            Ok(o) if o.status.success() => {}
            Ok(o) => {
                tracing::warn!(id = %self.id, stderr = %clip(&String::from_utf8_lossy(&o.stderr)), "runc delete failed")
            }
            Err(e) => tracing::warn!(id = %self.id, error = %e, "runc delete failed"),
        }
    }
}

/// Runs runc `args` to completion; its error text (from `--log`) goes into the error.
async fn runc_step(
    runc_root: &Path,
    log: &Path,
    op: &'static str,
    args: &[&str],
    stdin: bool,
) -> Result<(), OptimizeError> {
    use std::os::fd::AsFd;
    let stderr = std::io::stderr()
        .as_fd()
        .try_clone_to_owned()
        .map_err(|e| OptimizeError::Runc {
            op,
            detail: e.to_string(),
        })?;
    let status = tokio::process::Command::new("runc")
        .arg("--root")
        .arg(runc_root)
        .arg("--log")
        .arg(log)
        .args(args)
        .stdin(if stdin {
            std::process::Stdio::inherit()
        } else {
            std::process::Stdio::null()
        })
        .stdout(std::process::Stdio::from(stderr.try_clone().map_err(
            |e| OptimizeError::Runc {
                op,
                detail: e.to_string(),
            },
        )?))
        .stderr(std::process::Stdio::from(stderr))
        .status()
        .await
        .map_err(|e| OptimizeError::Runc {
            op,
            detail: format!("cannot run runc: {e}"),
        })?;
    if !status.success() {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(2)..].join(" | ");
        return Err(OptimizeError::Runc {
            op,
            detail: format!("{status}: {}", clip(&tail)),
        });
    }
    Ok(())
}

/// How the workload ended.
#[derive(Debug)]
enum Ended {
    Exited(i32),
    Signaled(String),
    TimedOut,
}

/// Mounts the layers, runs the workload for at most `opts.period` while fanotify records what
/// it opens, and returns the recorder; the container and the mount are gone when it returns.
async fn run_and_record(
    work: &Path,
    layers: usize,
    process: &Process,
    recorder: ImageRecorder,
    opts: &OptimizeOptions,
    progress: &mut (dyn Write + Send),
) -> Result<ImageRecorder, Error> {
    let mount = OverlayMount::mount(work, layers)?;
    let (uid, gid) = resolve_user(&mount.target, &process.user)?;
    let bundle = work.join("bundle");
    std::fs::create_dir_all(&bundle)?;
    write_etc_files(&bundle, &opts.net)?;
    let spec = runtime_spec(&mount.target, &bundle, process, uid, gid, opts);
    std::fs::write(
        bundle.join("config.json"),
        serde_json::to_vec_pretty(&spec)?,
    )?;

    // The container's init is orphaned when `runc create` exits; as subreaper we inherit it,
    // so waitpid gives us its exit status.
    // SAFETY: prctl with integer arguments only.
    unsafe {
        libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
    }
    let runc_root = work.join("runc");
    let log = work.join("runc.log");
    let id = format!("ctr-remote-optimize-{}", std::process::id());
    let pid_file = work.join("pid");
    let bundle_s = bundle.display().to_string();
    let pid_s = pid_file.display().to_string();
    let container = Container {
        runc_root: runc_root.clone(),
        id: id.clone(),
    };
    runc_step(
        &runc_root,
        &log,
        "create",
        &["create", "--bundle", &bundle_s, "--pid-file", &pid_s, &id],
        opts.stdin,
    )
    .await?;
    let pid: i32 = std::fs::read_to_string(&pid_file)?
        .trim()
        .parse()
        .map_err(|_| OptimizeError::Runc {
            op: "create",
            detail: "no pid file".into(),
        })?;

    let fan = Fanotify::mark(&mount.target)?;
    let stop = StopOnDrop(Arc::new(AtomicBool::new(false)));
    let reader = {
        let stop = stop.0.clone();
        let rootfs = mount.target.clone();
        std::thread::spawn(move || fan.read_until(stop, recorder, &rootfs))
    };
    let period = if opts.period.is_zero() {
        DEFAULT_PERIOD
    } else {
        opts.period
    };
    let how_long = if opts.wait_on_signal.is_some() {
        "until SIGINT (Ctrl+C)".to_string()
    } else {
        format!(
            "for up to {}s{}",
            period.as_secs_f64(),
            if opts.period.is_zero() {
                " (--period 0: Go's default)"
            } else {
                ""
            }
        )
    };
    writeln!(
        progress,
        "running {} {how_long} ({}), recording opened files",
        clip(&format!("{:?}", process.args)),
        if opts.net.host {
            "host network"
        } else {
            "no network"
        }
    )?;
    let started = Instant::now();
    let ended: Result<Ended, Error> = match runc_step(
        &runc_root,
        &log,
        "start",
        &["start", &id],
        false,
    )
    .await
    {
        Err(e) => Err(e.into()),
        Ok(()) => {
            let mut wait = tokio::task::spawn_blocking(move || wait_pid(pid));
            let stop_signal = async {
                match &opts.wait_on_signal {
                    Some(stop) => {
                        stop.waiting.store(true, Ordering::SeqCst);
                        stop.notify.notified().await
                    }
                    None => tokio::time::sleep(period).await,
                }
            };
            let ended = tokio::select! {
                r = &mut wait => r.map_err(|e| Error::Incomplete(format!("wait task: {e}"))).and_then(|r| r),
                _ = stop_signal => {
                    let _ = container.runc().args(["kill", "--all", &id, "KILL"]).output();
                    match tokio::time::timeout(KILL_GRACE, wait).await {
                        Ok(_) => Ok(Ended::TimedOut),
                        Err(_) => Err(OptimizeError::Runc { op: "kill", detail: "the workload did not die".into() }.into()),
                    }
                }
            };
            if let Some(stop) = &opts.wait_on_signal {
                stop.waiting.store(false, Ordering::SeqCst);
            }
            ended
        }
    };
    // Container gone first, then the last events are drained, then the mount goes.
    drop(container);
    drop(stop);
    let recorder = reader
        .join()
        .map_err(|_| Error::Incomplete("fanotify reader panicked".into()))?;
    drop(mount);
    let ended = ended?;
    let secs = started.elapsed().as_secs_f64();
    match &ended {
        Ended::Exited(0) => writeln!(progress, "workload exited with code 0 after {secs:.1}s")?,
        Ended::Exited(c) => writeln!(
            progress,
            "warning: workload exited with code {c} after {secs:.1}s; using what it opened"
        )?,
        Ended::Signaled(s) => writeln!(
            progress,
            "warning: workload killed by {s} after {secs:.1}s; using what it opened"
        )?,
        Ended::TimedOut if opts.wait_on_signal.is_some() => {
            writeln!(progress, "SIGINT: workload killed after {secs:.1}s")?
        }
        Ended::TimedOut => writeln!(
            progress,
            "period of {}s over: workload killed",
            period.as_secs_f64()
        )?,
    }
    Ok(recorder)
}

/// Tells the fanotify reader to drain and end, also when the future is dropped on a signal.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

fn wait_pid(pid: i32) -> Result<Ended, Error> {
    use nix::sys::wait::{waitpid, WaitStatus};
    loop {
        match waitpid(nix::unistd::Pid::from_raw(pid), None) {
            Ok(WaitStatus::Exited(_, code)) => return Ok(Ended::Exited(code)),
            Ok(WaitStatus::Signaled(_, sig, _)) => return Ok(Ended::Signaled(sig.to_string())),
            Ok(_) => continue,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(Error::Io(e.into())),
        }
    }
}

/// A fanotify group marking one filesystem for opens.
struct Fanotify {
    fd: OwnedFd,
}

impl Fanotify {
    fn mark(rootfs: &Path) -> Result<Self, OptimizeError> {
        let err = |op| move |source| OptimizeError::Fanotify { op, source };
        // SAFETY: plain syscall; the returned fd is owned below.
        let fd = unsafe {
            libc::fanotify_init(
                libc::FAN_CLOEXEC
                    | libc::FAN_NONBLOCK
                    | libc::FAN_CLASS_NOTIF
                    | libc::FAN_UNLIMITED_QUEUE,
                (libc::O_RDONLY | libc::O_LARGEFILE | libc::O_CLOEXEC) as libc::c_uint,
            )
        };
        if fd < 0 {
            return Err(err("init")(std::io::Error::last_os_error()));
        }
        // SAFETY: fd was just returned by fanotify_init and is owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let path = cstring(rootfs).map_err(err("mark"))?;
        // SAFETY: valid fd and NUL-terminated path.
        let r = unsafe {
            libc::fanotify_mark(
                fd.as_raw_fd(),
                libc::FAN_MARK_ADD | libc::FAN_MARK_FILESYSTEM,
                libc::FAN_OPEN | libc::FAN_OPEN_EXEC,
                libc::AT_FDCWD,
                path.as_ptr(),
            )
        };
        if r != 0 {
            return Err(err("mark")(std::io::Error::last_os_error()));
        }
        Ok(Self { fd })
    }

    /// Reads events until `stop` is set and the queue is empty, recording each opened path.
    fn read_until(
        self,
        stop: Arc<AtomicBool>,
        mut recorder: ImageRecorder,
        rootfs: &Path,
    ) -> ImageRecorder {
        const META: usize = std::mem::size_of::<libc::fanotify_event_metadata>();
        let me = std::process::id() as i32;
        let mut buf = vec![0u8; 64 * 1024];
        let (mut events, mut overflows) = (0u64, 0u64);
        loop {
            let stopping = stop.load(Ordering::SeqCst);
            // SAFETY: buf is valid for writes of its length.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                let e = std::io::Error::last_os_error();
                if n < 0
                    && e.kind() != std::io::ErrorKind::WouldBlock
                    && e.kind() != std::io::ErrorKind::Interrupted
                {
                    tracing::warn!(error = %e, "reading fanotify events");
                    break;
                }
                if stopping {
                    break;
                }
                let mut pfd = libc::pollfd {
                    fd: self.fd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd.
                unsafe { libc::poll(&mut pfd, 1, 50) };
                continue;
            }
            let n = n as usize;
            let mut off = 0;
            while off + META <= n {
                // SAFETY: at least META bytes remain at `off`; read_unaligned copes with alignment.
                let m: libc::fanotify_event_metadata =
                    unsafe { std::ptr::read_unaligned(buf[off..].as_ptr().cast()) };
                let len = m.event_len as usize;
                if len < META || off + len > n || m.vers != libc::FANOTIFY_METADATA_VERSION {
                    tracing::warn!(len, vers = m.vers, "malformed fanotify event; stopping");
                    return recorder;
                }
                off += len;
                if m.fd < 0 {
                    overflows += 1;
                    continue;
                }
                // SAFETY: the kernel gave us this fd; we own and close it.
                let efd = unsafe { OwnedFd::from_raw_fd(m.fd) };
                events += 1;
                if m.pid == me {
                    continue;
                }
                let Ok(link) = std::fs::read_link(format!("/proc/self/fd/{}", efd.as_raw_fd()))
                else {
                    continue;
                };
                if let Some(p) = container_path(&link, rootfs) {
                    if let Err(why) = recorder.record(&p) {
                        tracing::debug!(path = %clip(&p), ?why, "not recorded");
                    }
                }
            }
        }
        if overflows > 0 {
            tracing::warn!(
                overflows,
                "fanotify queue overflowed; the record may miss files"
            );
        }
        tracing::debug!(events, "fanotify events read");
        recorder
    }
}

/// The path inside the container of an event's file: the kernel prints it from the
/// container's root when the mount is in the container's namespace, or under our mount point
/// when it was opened through it; `None` for deleted or non-UTF-8 names.
fn container_path(link: &Path, rootfs: &Path) -> Option<String> {
    let s = link.to_str()?;
    if s.ends_with(" (deleted)") {
        return None;
    }
    let root = rootfs.to_str()?;
    match s.strip_prefix(root) {
        Some(rest) if rest.is_empty() || rest.starts_with('/') => Some(rest.to_string()),
        _ if s.starts_with('/') => Some(s.to_string()),
        _ => None,
    }
}

/// `/etc/resolv.conf` and `/etc/hosts` for the container, as Go's optimize writes them
/// (`--net-host` binds the host's instead).
fn write_etc_files(bundle: &Path, net: &NetOptions) -> Result<(), Error> {
    let mut resolv = String::new();
    for n in &net.nameservers {
        resolv.push_str(&format!("nameserver {n}\n"));
    }
    if !net.search.is_empty() {
        resolv.push_str(&format!("search {}\n", net.search.join(" ")));
    }
    if !net.options.is_empty() {
        resolv.push_str(&format!("options {}\n", net.options.join(" ")));
    }
    std::fs::write(bundle.join("resolv.conf"), resolv)?;
    let mut hosts = String::from(
        "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\nfe00::0\tip6-localnet\nff00::0\tip6-mcastprefix\nff02::1\tip6-allnodes\nff02::2\tip6-allrouters\n",
    );
    for h in &net.extra_hosts {
        let (host, ip) = h.split_once(':').ok_or_else(|| OptimizeError::Flag {
            flag: "--add-hosts",
            reason: format!("{} is not host:IP", clip(h)),
        })?;
        hosts.push_str(&format!("{ip}\t{host}\n"));
    }
    std::fs::write(bundle.join("hosts"), hosts)?;
    Ok(())
}

/// Go's `parseMountFlag`: `type=foo,source=/path,destination=/target,options=rbind:rw`.
pub(crate) fn parse_mount_flag(m: &str) -> Result<serde_json::Value, OptimizeError> {
    let bad = |reason: String| OptimizeError::Flag {
        flag: "--mount",
        reason,
    };
    let mut mount = serde_json::json!({});
    for field in m.split(',') {
        let (k, v) = field
            .split_once('=')
            .filter(|(_, v)| !v.contains('='))
            .ok_or_else(|| bad(format!("{}: expected key=val", clip(field))))?;
        match k {
            "type" => mount["type"] = v.into(),
            "source" | "src" => mount["source"] = v.into(),
            "destination" | "dst" => mount["destination"] = v.into(),
            "options" => mount["options"] = v.split(':').collect::<Vec<_>>().into(),
            _ => return Err(bad(format!("mount option {} not supported", clip(k)))),
        }
    }
    if mount["destination"].as_str().is_none_or(str::is_empty) {
        return Err(bad(format!("{}: no destination", clip(m))));
    }
    Ok(mount)
}

/// containerd's default Linux spec (`oci.WithDefaultSpec`) with the image's process.
fn runtime_spec(
    rootfs: &Path,
    bundle: &Path,
    p: &Process,
    uid: u32,
    gid: u32,
    opts: &OptimizeOptions,
) -> serde_json::Value {
    let caps = [
        "CAP_CHOWN",
        "CAP_DAC_OVERRIDE",
        "CAP_FSETID",
        "CAP_FOWNER",
        "CAP_MKNOD",
        "CAP_NET_RAW",
        "CAP_SETGID",
        "CAP_SETUID",
        "CAP_SETFCAP",
        "CAP_SETPCAP",
        "CAP_NET_BIND_SERVICE",
        "CAP_SYS_CHROOT",
        "CAP_KILL",
        "CAP_AUDIT_WRITE",
    ];
    let (resolv, hosts) = if opts.net.host {
        (
            PathBuf::from("/etc/resolv.conf"),
            PathBuf::from("/etc/hosts"),
        )
    } else {
        (bundle.join("resolv.conf"), bundle.join("hosts"))
    };
    let mut mounts = serde_json::json!([
        {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
        {"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
        {"destination": "/run", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        {"destination": "/etc/resolv.conf", "type": "bind", "source": resolv, "options": ["bind"]},
        {"destination": "/etc/hosts", "type": "bind", "source": hosts, "options": ["bind"]}
    ]);
    if let Some(m) = mounts.as_array_mut() {
        m.extend(opts.mounts.iter().cloned());
    }
    let mut namespaces = vec![
        serde_json::json!({"type": "pid"}),
        serde_json::json!({"type": "ipc"}),
        serde_json::json!({"type": "uts"}),
        serde_json::json!({"type": "mount"}),
    ];
    if !opts.net.host {
        namespaces.push(serde_json::json!({"type": "network"}));
    }
    serde_json::json!({
        "ociVersion": "1.0.2-dev",
        "process": {
            "terminal": false,
            "user": {"uid": uid, "gid": gid},
            "args": p.args,
            "env": p.env,
            "cwd": p.cwd,
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": true
        },
        "root": {"path": rootfs, "readonly": false},
        "hostname": "optimize",
        "mounts": mounts,
        "linux": {
            "resources": {"devices": [{"allow": false, "access": "rwm"}]},
            "namespaces": namespaces,
            "maskedPaths": [
                "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
                "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware", "/proc/scsi"
            ],
            "readonlyPaths": [
                "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"
            ]
        }
    })
}

/// containerd's `WithUser` on the image's `/etc/passwd` and `/etc/group` (read before the
/// fanotify mark, so they are not recorded — as in Go, where the spec is built first).
fn resolve_user(rootfs: &Path, user: &str) -> Result<(u32, u32), OptimizeError> {
    if user.is_empty() {
        return Ok((0, 0));
    }
    let (u, g) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let read = |rel: &str| -> String {
        let p = rootfs.join(rel);
        // Never follow a symlink out of the image.
        match p.symlink_metadata() {
            Ok(m) if m.is_file() => std::fs::read_to_string(&p).unwrap_or_default(),
            _ => String::new(),
        }
    };
    let passwd = read("etc/passwd");
    let lookup = |db: &str, name: &str, field: usize| -> Option<u32> {
        db.lines()
            .map(|l| l.split(':').collect::<Vec<_>>())
            .find(|f| f.first() == Some(&name))
            .and_then(|f| f.get(field).and_then(|s| s.parse().ok()))
    };
    let (uid, primary) = match u.parse::<u32>() {
        Ok(n) => (
            n,
            passwd
                .lines()
                .map(|l| l.split(':').collect::<Vec<_>>())
                .find(|f| f.get(2).and_then(|s| s.parse::<u32>().ok()) == Some(n))
                .and_then(|f| f.get(3).and_then(|s| s.parse().ok()))
                .unwrap_or(0),
        ),
        Err(_) => (
            lookup(&passwd, u, 2).ok_or_else(|| OptimizeError::User(clip(user)))?,
            lookup(&passwd, u, 3).unwrap_or(0),
        ),
    };
    let gid = match g {
        None => primary,
        Some(g) => match g.parse::<u32>() {
            Ok(n) => n,
            Err(_) => {
                lookup(&read("etc/group"), g, 2).ok_or_else(|| OptimizeError::User(clip(user)))?
            }
        },
    };
    Ok((uid, gid))
}

/// `--entrypoint`/`--args` values: JSON arrays of strings, as Go parses them.
pub(crate) fn parse_json_args(
    flag: &'static str,
    value: Option<&str>,
) -> Result<Option<Vec<String>>, OptimizeError> {
    match value.filter(|v| !v.is_empty()) {
        None => Ok(None),
        Some(v) => serde_json::from_str::<Vec<String>>(v)
            .map(Some)
            .map_err(|e| OptimizeError::Flag {
                flag,
                reason: format!("not a JSON array of strings ({e}): {}", clip(v)),
            }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> OptimizeOptions {
        OptimizeOptions {
            oci: false,
            period: DEFAULT_PERIOD,
            entrypoint: None,
            args: None,
            env: vec![],
            cwd: None,
            user: None,
            record_out: None,
            compression_level: 9,
            chunk_size: 0,
            registry: RegistryOptions::default(),
            no_optimize: false,
            reuse: false,
            stdin: false,
            net: NetOptions::default(),
            mounts: vec![],
            wait_on_signal: None,
        }
    }

    #[test]
    fn mount_flags_as_go_parses_them() {
        let m = parse_mount_flag("type=bind,src=/a,dst=/b,options=rbind:ro").unwrap();
        assert_eq!(
            m,
            serde_json::json!({"type": "bind", "source": "/a", "destination": "/b", "options": ["rbind", "ro"]})
        );
        assert!(parse_mount_flag("type=bind,source=/a").is_err());
        assert!(parse_mount_flag("type=bind,foo=1,destination=/b").is_err());
        assert!(parse_mount_flag("destination").is_err());
    }

    #[test]
    fn process_from_config_and_overrides() {
        let cfg = serde_json::json!({"config": {
            "Entrypoint": ["python3"], "Cmd": ["/app/main.py"],
            "Env": ["PATH=/bin", "A=1"], "WorkingDir": "/app", "User": "1000"}});
        let p = Process::from_config("img", &cfg, &opts()).unwrap();
        assert_eq!(p.args, ["python3", "/app/main.py"]);
        assert_eq!(p.env, ["PATH=/bin", "A=1"]);
        assert_eq!((p.cwd.as_str(), p.user.as_str()), ("/app", "1000"));

        let mut o = opts();
        o.args = Some(vec!["-c".into(), "pass".into()]);
        o.env = vec!["A=2".into(), "B=3".into()];
        let p = Process::from_config("img", &cfg, &o).unwrap();
        assert_eq!(p.args, ["python3", "-c", "pass"]);
        assert_eq!(p.env, ["PATH=/bin", "A=2", "B=3"]);

        let empty = serde_json::json!({"config": {}});
        let e = Process::from_config("img", &empty, &opts()).unwrap_err();
        assert!(e.to_string().contains("no entrypoint or cmd"), "{e}");
    }

    #[test]
    fn json_args_are_go_arrays() {
        assert_eq!(parse_json_args("--args", None).unwrap(), None);
        assert_eq!(
            parse_json_args("--args", Some(r#"["a","b c"]"#)).unwrap(),
            Some(vec!["a".to_string(), "b c".to_string()])
        );
        assert!(parse_json_args("--args", Some("sh -c x")).is_err());
    }

    #[test]
    fn container_paths() {
        let root = Path::new("/tmp/w/rootfs");
        assert_eq!(
            container_path(Path::new("/usr/bin/dash"), root).as_deref(),
            Some("/usr/bin/dash")
        );
        assert_eq!(
            container_path(Path::new("/tmp/w/rootfs/etc/os-release"), root).as_deref(),
            Some("/etc/os-release")
        );
        assert_eq!(container_path(Path::new("/x (deleted)"), root), None);
    }

    #[test]
    fn users_resolve_from_the_image() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("etc")).unwrap();
        std::fs::write(
            d.path().join("etc/passwd"),
            "root:x:0:0::/root:/bin/sh\napp:x:1000:1001::/app:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(d.path().join("etc/group"), "root:x:0:\nstaff:x:50:\n").unwrap();
        assert_eq!(resolve_user(d.path(), "").unwrap(), (0, 0));
        assert_eq!(resolve_user(d.path(), "app").unwrap(), (1000, 1001));
        assert_eq!(resolve_user(d.path(), "1000").unwrap(), (1000, 1001));
        assert_eq!(resolve_user(d.path(), "app:staff").unwrap(), (1000, 50));
        assert_eq!(resolve_user(d.path(), "42:7").unwrap(), (42, 7));
        assert!(resolve_user(d.path(), "nobody-here").is_err());
    }
}
