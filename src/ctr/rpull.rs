//! `image rpull`: fetch manifest and config into containerd's content store, then unpack
//! layer by layer through the `stargz` snapshotter the way containerd 1.6's client-side
//! unpacker does, so the snapshotter can answer "already exists" for layers it mounts lazily.

use std::collections::HashMap;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use containerd_client::services::v1::snapshots::{
    CommitSnapshotRequest, PrepareSnapshotRequest, RemoveSnapshotRequest, StatSnapshotRequest,
};
use containerd_client::services::v1::ApplyRequest;
use futures_util::StreamExt;
use tonic::Code;

use super::client::{to_pb, Containerd};
use super::labels::{append_default_labels, snapshot_labels};
use super::registry::Fetcher;
use super::Error;
use crate::labels::STARGZ_SKIP_VERIFY;
use crate::oci::{chain_ids, host_platform, is_index_type, Config, Descriptor, Index, Manifest};
use crate::remote::Reference;

/// Options of `image rpull` beyond the registry ones.
#[derive(Debug, Clone)]
pub struct RpullOptions {
    pub snapshotter: String,
    pub skip_content_verify: bool,
    pub prefetch_size: u64,
    /// Labels for the image record (`--label k=v`).
    pub image_labels: HashMap<String, String>,
}

/// What happened to one layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerOutcome {
    /// The committed snapshot for its chain ID already existed.
    AlreadyUnpacked,
    /// The snapshotter prepared it remotely (Prepare answered AlreadyExists): nothing downloaded.
    Remote,
    /// Fallback: the blob was downloaded (bytes) and applied.
    Downloaded(u64),
}

/// Result of a pull, for the summary line and tests.
#[derive(Debug, Clone)]
pub struct PullSummary {
    pub layers: Vec<(Descriptor, LayerOutcome)>,
}

impl PullSummary {
    pub fn image_size(&self) -> i64 {
        self.layers.iter().map(|(d, _)| d.size).sum()
    }
    pub fn downloaded(&self) -> u64 {
        self.layers
            .iter()
            .map(|(_, o)| {
                if let LayerOutcome::Downloaded(n) = o {
                    *n
                } else {
                    0
                }
            })
            .sum()
    }
}

/// Label containerd's fetcher puts on content so it knows where a blob came from; the key
/// holds the host name without the port, as containerd writes it.
fn source_label(reference: &Reference) -> HashMap<String, String> {
    let host = match reference.host.rsplit_once(':') {
        Some((h, port)) if port.chars().all(|c| c.is_ascii_digit()) => h,
        _ => reference.host.as_str(),
    };
    HashMap::from([(
        format!("containerd.io/distribution.source.{host}"),
        reference.repository.clone(),
    )])
}

/// Pulls `image_ref` into containerd inside a lease and unpacks it. Progress lines go to
/// `out` ("fetching …" like Go's) and `progress` (per-layer state).
pub async fn rpull<F: Fetcher>(
    cd: &Containerd,
    fetcher: &F,
    image_ref: &str,
    reference: &Reference,
    opts: &RpullOptions,
    out: &mut (dyn Write + Send),
    progress: &mut (dyn Write + Send),
) -> Result<PullSummary, Error> {
    let (leased, lease) = cd.with_new_lease().await?;
    let result = pull_in_lease(&leased, fetcher, image_ref, reference, opts, out, progress).await;
    // The image record now holds everything through GC references; the lease can go.
    if let Err(e) = cd.delete_lease(&lease).await {
        tracing::warn!(lease = %lease, error = %crate::untrusted::chain(&e), "failed to delete lease");
    }
    result
}

async fn pull_in_lease<F: Fetcher>(
    cd: &Containerd,
    fetcher: &F,
    image_ref: &str,
    reference: &Reference,
    opts: &RpullOptions,
    out: &mut (dyn Write + Send),
    progress: &mut (dyn Write + Send),
) -> Result<PullSummary, Error> {
    let source = source_label(reference);
    let (top, top_bytes) = fetcher.resolve().await?;
    writeln!(out, "fetching {}... {}", short(&top.digest), top.media_type)?;

    let (manifest_desc, manifest_bytes) = if is_index_type(&top.media_type) {
        let index: Index = serde_json::from_slice(&top_bytes)?;
        let mut labels = source.clone();
        for (i, m) in index.manifests.iter().enumerate() {
            labels.insert(
                format!("containerd.io/gc.ref.content.m.{i}"),
                m.digest.clone(),
            );
        }
        cd.write_bytes(&top, top_bytes.clone(), &labels).await?;
        let want = host_platform();
        let chosen = index
            .manifests
            .iter()
            .find(|m| {
                m.platform
                    .as_ref()
                    .is_none_or(|p| p.os == want.os && p.architecture == want.architecture)
            })
            .cloned()
            .ok_or_else(|| {
                Error::NotFound(format!("no manifest for {}/{}", want.os, want.architecture))
            })?;
        writeln!(
            out,
            "fetching {}... {}",
            short(&chosen.digest),
            chosen.media_type
        )?;
        let bytes = fetcher.fetch_small(&chosen).await?;
        (chosen, bytes)
    } else {
        (top.clone(), top_bytes)
    };
    let manifest: Manifest = serde_json::from_slice(&manifest_bytes)?;

    writeln!(
        out,
        "fetching {}... {}",
        short(&manifest.config.digest),
        manifest.config.media_type
    )?;
    let config_bytes = fetcher.fetch_small(&manifest.config).await?;
    let config: Config = serde_json::from_slice(&config_bytes)?;
    cd.write_bytes(&manifest.config, config_bytes, &source)
        .await?;

    let mut labels = source.clone();
    labels.insert(
        "containerd.io/gc.ref.content.config".into(),
        manifest.config.digest.clone(),
    );
    for (i, l) in manifest.layers.iter().enumerate() {
        labels.insert(
            format!("containerd.io/gc.ref.content.l.{i}"),
            l.digest.clone(),
        );
    }
    let mut manifest_desc = manifest_desc;
    manifest_desc.platform = None;
    cd.write_bytes(&manifest_desc, manifest_bytes, &labels)
        .await?;

    let mut layers = manifest.layers.clone();
    append_default_labels(image_ref, &mut layers, opts.prefetch_size);
    for l in &layers {
        writeln!(out, "fetching {}... {}", short(&l.digest), l.media_type)?;
    }
    let (outcomes, chains) = unpack(cd, fetcher, &layers, &config, &source, opts, progress).await?;

    cd.update_content_labels(
        &manifest.config.digest,
        &HashMap::from([(
            format!("containerd.io/gc.ref.snapshot.{}", opts.snapshotter),
            chains.last().cloned().unwrap_or_default(),
        )]),
    )
    .await?;
    cd.put_image(image_ref, &top, &opts.image_labels).await?;
    Ok(PullSummary { layers: outcomes })
}

/// containerd 1.6 `unpacker.unpack` for one platform: chain by chain, skip what exists,
/// Prepare with the inherited labels, and only download when the snapshotter did not
/// prepare the layer remotely.
async fn unpack<F: Fetcher>(
    cd: &Containerd,
    fetcher: &F,
    layers: &[Descriptor],
    config: &Config,
    source: &HashMap<String, String>,
    opts: &RpullOptions,
    progress: &mut (dyn Write + Send),
) -> Result<(Vec<(Descriptor, LayerOutcome)>, Vec<String>), Error> {
    let diff_ids = &config.rootfs.diff_ids;
    if diff_ids.len() != layers.len() {
        return Err(Error::InvalidArgument(format!(
            "image has {} layers but {} diff IDs",
            layers.len(),
            diff_ids.len()
        )));
    }
    let chains = chain_ids(diff_ids);
    let mut extra = HashMap::new();
    if opts.skip_content_verify {
        tracing::warn!("content verification disabled");
        extra.insert(STARGZ_SKIP_VERIFY.to_string(), "true".to_string());
    }
    let mut outcomes = Vec::with_capacity(layers.len());
    for (i, layer) in layers.iter().enumerate() {
        let parent = if i == 0 {
            String::new()
        } else {
            chains[i - 1].clone()
        };
        let labels = snapshot_labels(layer, &chains[i], &extra);
        let step = LayerStep {
            cd,
            snapshotter: &opts.snapshotter,
            chain_id: &chains[i],
            parent,
            labels,
        };
        let outcome = step.run(fetcher, layer, &diff_ids[i], source).await?;
        let what = match outcome {
            LayerOutcome::AlreadyUnpacked => "already unpacked".to_string(),
            LayerOutcome::Remote => "remote (lazy)".to_string(),
            LayerOutcome::Downloaded(n) => format!("downloaded {} (not lazy: fallback)", human(n)),
        };
        writeln!(
            progress,
            "layer {}/{} {} {}: {what}",
            i + 1,
            layers.len(),
            short(&layer.digest),
            human(layer.size.max(0) as u64)
        )?;
        outcomes.push((layer.clone(), outcome));
    }
    Ok((outcomes, chains))
}

struct LayerStep<'a> {
    cd: &'a Containerd,
    snapshotter: &'a str,
    chain_id: &'a str,
    parent: String,
    labels: HashMap<String, String>,
}

static KEY_COUNTER: AtomicU64 = AtomicU64::new(0);

/// containerd's `snapshots.UnpackKeyFormat` ("extract-%s %s") with a unique part.
fn unpack_key(chain_id: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    let n = KEY_COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("extract-{nanos}-{}{n} {chain_id}", std::process::id())
}

impl LayerStep<'_> {
    async fn exists(&self) -> Result<bool, Error> {
        let req = StatSnapshotRequest {
            snapshotter: self.snapshotter.into(),
            key: self.chain_id.into(),
        };
        match self.cd.snapshots().stat(req).await {
            Ok(_) => Ok(true),
            Err(s) if s.code() == Code::NotFound => Ok(false),
            Err(source) => Err(Error::Grpc {
                op: "snapshots.stat",
                status: source,
            }),
        }
    }

    async fn run<F: Fetcher>(
        &self,
        fetcher: &F,
        layer: &Descriptor,
        diff_id: &str,
        source: &HashMap<String, String>,
    ) -> Result<LayerOutcome, Error> {
        if self.exists().await? {
            return Ok(LayerOutcome::AlreadyUnpacked);
        }
        let mut prepared = None;
        for _ in 0..3 {
            let key = unpack_key(self.chain_id);
            let req = PrepareSnapshotRequest {
                snapshotter: self.snapshotter.into(),
                key: key.clone(),
                parent: self.parent.clone(),
                labels: self.labels.clone(),
            };
            match self.cd.snapshots().prepare(req).await {
                Ok(r) => {
                    prepared = Some((key, r.into_inner().mounts));
                    break;
                }
                // The remote snapshotter committed `chain_id` itself: the layer is lazy.
                Err(s) if s.code() == Code::AlreadyExists => {
                    if self.exists().await? {
                        tracing::debug!(chain_id = %self.chain_id, digest = %layer.digest, "remote snapshot prepared");
                        return Ok(LayerOutcome::Remote);
                    }
                    tracing::debug!(key = %key, "extraction snapshot already exists, chain id not found; retrying");
                }
                Err(source) => {
                    return Err(Error::Grpc {
                        op: "snapshots.prepare",
                        status: source,
                    })
                }
            }
        }
        let (key, mounts) =
            prepared.ok_or_else(|| Error::Incomplete(format!("prepare {}", self.chain_id)))?;
        match self
            .apply(fetcher, layer, diff_id, source, &key, mounts)
            .await
        {
            Ok(n) => Ok(LayerOutcome::Downloaded(n)),
            Err(e) => {
                let rm = RemoveSnapshotRequest {
                    snapshotter: self.snapshotter.into(),
                    key: key.clone(),
                };
                if let Err(s) = self.cd.snapshots().remove(rm).await {
                    // Plain `%s`: a `Status` prints its own source.
                    tracing::warn!(key = %key, error = %s, "failed to remove extraction snapshot");
                }
                Err(e)
            }
        }
    }

    /// Fallback: download the blob into the content store, apply it onto the active
    /// snapshot, check the diff ID, commit under the chain ID.
    async fn apply<F: Fetcher>(
        &self,
        fetcher: &F,
        layer: &Descriptor,
        diff_id: &str,
        source: &HashMap<String, String>,
        key: &str,
        mounts: Vec<containerd_client::types::Mount>,
    ) -> Result<u64, Error> {
        let counted = Arc::new(AtomicU64::new(0));
        if self.cd.content_info(&layer.digest).await?.is_none() {
            let c = counted.clone();
            let bar = super::progress::bytes(
                format!("{}: downloading", short(&layer.digest)),
                layer.size.max(0) as u64,
            );
            let b = bar.clone();
            let stream = fetcher.fetch_stream(layer).await?.inspect(move |r| {
                if let Ok(chunk) = r {
                    c.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                    b.inc(chunk.len() as u64);
                }
            });
            let written = self.cd.write_stream(layer, stream, source).await;
            bar.finish_and_clear();
            written?;
        }
        let applied = self
            .cd
            .diff()
            .apply(ApplyRequest {
                diff: Some(to_pb(layer)),
                mounts,
                payloads: HashMap::new(),
                sync_fs: false,
            })
            .await
            .map_err(|source| Error::Grpc {
                op: "diff.apply",
                status: source,
            })?
            .into_inner()
            .applied
            .ok_or_else(|| Error::Incomplete(format!("apply {}", layer.digest)))?;
        if applied.digest != diff_id {
            return Err(Error::DigestMismatch {
                expected: diff_id.to_string(),
                got: applied.digest,
            });
        }
        let req = CommitSnapshotRequest {
            snapshotter: self.snapshotter.into(),
            name: self.chain_id.into(),
            key: key.into(),
            labels: self.labels.clone(),
        };
        match self.cd.snapshots().commit(req).await {
            Ok(_) => {}
            Err(s) if s.code() == Code::AlreadyExists => {}
            Err(source) => {
                return Err(Error::Grpc {
                    op: "snapshots.commit",
                    status: source,
                })
            }
        }
        Ok(counted.load(Ordering::Relaxed))
    }
}

/// `sha256:0123456` — the 15-character prefix Go's rpull prints.
pub fn short(digest: &str) -> &str {
    digest.get(..15).unwrap_or(digest)
}

pub fn human(n: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    //! The lazy path of the unpacker against a fake remote snapshotter served over a unix
    //! socket (the same Snapshots API containerd proxies), since proving it end to end needs
    //! a daemon that mounts layers remotely.

    use std::collections::HashMap;
    use std::sync::Mutex;

    use tonic::{Request, Response, Status};

    use super::*;
    use crate::ctr::registry::BlobStream;
    use crate::labels::{SNAPSHOT_REF, STARGZ_DIGEST, STARGZ_LAYERS, TOC_DIGEST};
    use crate::oci::{RootFs, MEDIA_OCI_LAYER_GZIP};
    use crate::proto::containerd::services::snapshots::v1 as pb;

    /// Commits the target itself and answers AlreadyExists, like a remote snapshotter.
    #[derive(Default)]
    struct FakeRemote {
        committed: Mutex<HashMap<String, String>>,
        /// (key, parent, labels) of every Prepare.
        prepares: Mutex<Vec<Prepared>>,
    }

    type Res<T> = Result<Response<T>, Status>;
    type Prepared = (String, String, HashMap<String, String>);

    #[tonic::async_trait]
    impl pb::snapshots_server::Snapshots for FakeRemote {
        async fn prepare(
            &self,
            r: Request<pb::PrepareSnapshotRequest>,
        ) -> Res<pb::PrepareSnapshotResponse> {
            let r = r.into_inner();
            self.prepares
                .lock()
                .unwrap()
                .push((r.key.clone(), r.parent.clone(), r.labels.clone()));
            let target = r.labels.get(SNAPSHOT_REF).cloned().unwrap_or_default();
            self.committed.lock().unwrap().insert(target, r.parent);
            Err(Status::already_exists("target snapshot exists"))
        }
        async fn view(&self, _: Request<pb::ViewSnapshotRequest>) -> Res<pb::ViewSnapshotResponse> {
            Err(Status::unimplemented("view"))
        }
        async fn mounts(&self, _: Request<pb::MountsRequest>) -> Res<pb::MountsResponse> {
            Err(Status::unimplemented("mounts"))
        }
        async fn commit(&self, _: Request<pb::CommitSnapshotRequest>) -> Res<()> {
            Err(Status::unimplemented("commit"))
        }
        async fn remove(&self, _: Request<pb::RemoveSnapshotRequest>) -> Res<()> {
            Err(Status::unimplemented("remove"))
        }
        async fn stat(&self, r: Request<pb::StatSnapshotRequest>) -> Res<pb::StatSnapshotResponse> {
            let key = r.into_inner().key;
            match self.committed.lock().unwrap().get(&key) {
                Some(parent) => Ok(Response::new(pb::StatSnapshotResponse {
                    info: Some(pb::Info {
                        name: key,
                        parent: parent.clone(),
                        ..Default::default()
                    }),
                })),
                None => Err(Status::not_found(key)),
            }
        }
        async fn update(
            &self,
            _: Request<pb::UpdateSnapshotRequest>,
        ) -> Res<pb::UpdateSnapshotResponse> {
            Err(Status::unimplemented("update"))
        }
        type ListStream = tokio_stream::Empty<Result<pb::ListSnapshotsResponse, Status>>;
        async fn list(&self, _: Request<pb::ListSnapshotsRequest>) -> Res<Self::ListStream> {
            Err(Status::unimplemented("list"))
        }
        async fn usage(&self, _: Request<pb::UsageRequest>) -> Res<pb::UsageResponse> {
            Err(Status::unimplemented("usage"))
        }
        async fn cleanup(&self, _: Request<pb::CleanupRequest>) -> Res<()> {
            Err(Status::unimplemented("cleanup"))
        }
    }

    /// A fetcher that must never be asked for a layer.
    struct NoDownloads;

    impl Fetcher for NoDownloads {
        async fn resolve(&self) -> Result<(Descriptor, bytes::Bytes), Error> {
            Err(Error::Unsupported("resolve".into()))
        }
        async fn fetch_small(&self, _: &Descriptor) -> Result<bytes::Bytes, Error> {
            Err(Error::Unsupported("fetch_small".into()))
        }
        async fn fetch_stream(&self, d: &Descriptor) -> Result<BlobStream, Error> {
            Err(Error::Unsupported(format!(
                "a remote layer was downloaded: {}",
                d.digest
            )))
        }
    }

    fn layer(n: u8) -> Descriptor {
        Descriptor {
            media_type: MEDIA_OCI_LAYER_GZIP.into(),
            digest: format!("sha256:{:064x}", n),
            size: 100,
            urls: vec![],
            annotations: [(TOC_DIGEST.to_string(), format!("sha256:{:064x}", n + 100))].into(),
            platform: None,
        }
    }

    #[tokio::test]
    async fn remote_layers_are_skipped_with_labels_and_parents() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("fake.sock");
        let fake = std::sync::Arc::new(FakeRemote::default());
        let listener = tokio::net::UnixListener::bind(&sock).unwrap();
        let svc = pb::snapshots_server::SnapshotsServer::from_arc(fake.clone());
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener)),
        );
        let cd = Containerd::connect(&sock, "default").await.unwrap();

        let mut layers = vec![layer(1), layer(2), layer(3)];
        append_default_labels("reg/img:1", &mut layers, 7);
        let config = Config {
            rootfs: RootFs {
                kind: "layers".into(),
                diff_ids: (11..14).map(|n| format!("sha256:{:064x}", n)).collect(),
            },
            extra: Default::default(),
        };
        let opts = RpullOptions {
            snapshotter: "stargz".into(),
            skip_content_verify: true,
            prefetch_size: 7,
            image_labels: HashMap::new(),
        };
        let mut progress = Vec::new();
        let (outcomes, chains) = unpack(
            &cd,
            &NoDownloads,
            &layers,
            &config,
            &HashMap::new(),
            &opts,
            &mut progress,
        )
        .await
        .unwrap();
        assert!(
            outcomes.iter().all(|(_, o)| *o == LayerOutcome::Remote),
            "{outcomes:?}"
        );
        assert_eq!(
            String::from_utf8_lossy(&progress)
                .matches("remote (lazy)")
                .count(),
            3
        );

        let prepares = fake.prepares.lock().unwrap().clone();
        assert_eq!(prepares.len(), 3);
        for (i, (key, parent, labels)) in prepares.iter().enumerate() {
            assert!(
                key.starts_with("extract-") && key.ends_with(&format!(" {}", chains[i])),
                "{key}"
            );
            assert_eq!(parent, if i == 0 { "" } else { &chains[i - 1] });
            assert_eq!(labels[SNAPSHOT_REF], chains[i]);
            assert_eq!(labels[STARGZ_DIGEST], layers[i].digest);
            assert_eq!(labels[STARGZ_LAYERS].split(',').count(), 3 - i);
            assert_eq!(labels[STARGZ_SKIP_VERIFY], "true");
            assert_eq!(labels[TOC_DIGEST], layers[i].annotations[TOC_DIGEST]);
        }

        // Pulling again finds the committed chain and prepares nothing.
        let (again, _) = unpack(
            &cd,
            &NoDownloads,
            &layers,
            &config,
            &HashMap::new(),
            &opts,
            &mut Vec::new(),
        )
        .await
        .unwrap();
        assert!(again
            .iter()
            .all(|(_, o)| *o == LayerOutcome::AlreadyUnpacked));
        assert_eq!(fake.prepares.lock().unwrap().len(), 3);
        server.abort();
    }
}
