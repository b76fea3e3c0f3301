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

mod sandbox;
mod unpack;

pub(crate) use sandbox::parse_mount_flag;
use sandbox::run_and_record;
use unpack::unpack_layers;

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use tonic::Code;

use super::client::Containerd;
use super::convert::{convert, stored_image, ConvertOptions};
use super::recorder::{ImageRecorder, MAX_INDEX_ENTRIES};
use super::registry::{Fetcher, RegistryOptions, RemoteFetcher};
use super::rpull::{rpull, RpullOptions};
use super::toc::layer_toc;
use super::Error;
use crate::estargz::Format;
use crate::labels::TOC_DIGEST;
use crate::oci::{host_platform, is_layer_type, Descriptor, Manifest};
use crate::remote::Reference;
use crate::untrusted::clip;

/// Go's default monitoring period; `--period 0` means it too, as in Go.
pub(crate) const DEFAULT_PERIOD: Duration = Duration::from_secs(10);
/// overlayfs' `lowerdir` must fit in one page with our short paths; 128 layers is Docker's limit.
const MAX_LAYERS: usize = 128;

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
    /// eStargz or zstd:chunked layers (`--zstdchunked`).
    pub format: Format,
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
            "converting {} layers to {} without optimization",
            manifest.layers.len(),
            format_name(opts.format)
        )?;
        let copts = ConvertOptions {
            oci: opts.oci,
            format: opts.format,
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
            if recorder.files_of_layer(i) == 0 && reusable(cd, layer, opts.format).await {
                keep_layers.push(i);
            }
        }
    }
    writeln!(
        progress,
        "converting {} layers to {}",
        manifest.layers.len() - keep_layers.len(),
        format_name(opts.format)
    )?;
    let copts = ConvertOptions {
        oci: opts.oci,
        format: opts.format,
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

fn format_name(format: Format) -> &'static str {
    match format {
        Format::Gzip => "eStargz",
        Format::ZstdChunked => "zstd:chunked",
    }
}

/// Go's `isReusableESGZLayer`: the layer says its TOC digest, and the TOC in the blob has it
/// (and is in the format the image is optimized to).
async fn reusable(cd: &Containerd, layer: &Descriptor, format: Format) -> bool {
    let Some(want) = layer.annotations.get(TOC_DIGEST) else {
        return false;
    };
    match layer_toc(cd, &layer.digest, format).await {
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
    let (target, manifest, config) = stored_image(cd, &image, src).await?;
    let want = host_platform();
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
            format: Format::Gzip,
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
}
