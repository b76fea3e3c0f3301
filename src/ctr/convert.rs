//! `image convert --estargz [--oci]` and `--zstdchunked --oci`: rebuild every layer of an image
//! that is in containerd's content store as eStargz or zstd:chunked and record the result as a
//! new image.
//!
//! Blobs are spooled to temp files and streamed back into the content store; no layer is
//! ever held in memory (the builder itself keeps only per-entry metadata).

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;

use bytes::Bytes;
use futures_util::Stream;
use tokio::io::AsyncReadExt;

use super::client::{from_pb, Containerd};
use super::recorder::Entry as RecordEntry;
use super::Error;
use crate::estargz::{self, BuildOptions, Format};
use crate::labels::{
    TOC_DIGEST, UNCOMPRESSED, UNCOMPRESSED_SIZE, ZSTD_CHUNKED_MANIFEST_CHECKSUM,
    ZSTD_CHUNKED_MANIFEST_POSITION,
};
use crate::oci::{
    host_platform, is_index_type, is_layer_type, sha256_digest, Descriptor, Index, Manifest,
    MEDIA_DOCKER_CONFIG, MEDIA_DOCKER_LAYER_GZIP, MEDIA_DOCKER_MANIFEST, MEDIA_OCI_CONFIG,
    MEDIA_OCI_LAYER_GZIP, MEDIA_OCI_LAYER_ZSTD, MEDIA_OCI_MANIFEST,
};
use containerd_client::services::v1::Image;

/// Options of `image convert`.
#[derive(Debug, Clone)]
pub struct ConvertOptions {
    /// Use OCI media types for manifest, config and layers.
    pub oci: bool,
    /// eStargz (gzip) or zstd:chunked layers.
    pub format: Format,
    /// The format's level: gzip 0-9, zstd 1-22.
    pub compression_level: u32,
    /// 0 = the builder's default (4 MiB).
    pub chunk_size: u64,
    /// Lines of `ctr-remote optimize --record-out` output: files to put first, per layer.
    pub record_in: Option<PathBuf>,
    /// Where to spool blobs; `None` = the system temp dir.
    pub tmp_dir: Option<PathBuf>,
    /// Indexes of layers to keep as they are (`optimize --reuse`: already eStargz, not read).
    pub keep_layers: Vec<usize>,
}

/// Largest record file read: a bound for outside input (a real record is a few hundred KiB).
const MAX_RECORD_BYTES: u64 = 64 << 20;

/// Files to prioritise in layer `index` of the image whose manifest is `manifest_digest`.
///
/// A record made on this very image (Go's and our `optimize` write its manifest digest and the
/// layer of each file) is applied per layer, as `optimize` applies it: a file goes first only in
/// the layer the workload read it from, not in lower layers holding a shadowed copy. Any other
/// record (another image, or no digests) is applied as Go's `convert --estargz-record-in` does:
/// every recorded path, first-seen order, in every layer that has it.
fn prioritized_files(record: &[RecordEntry], manifest_digest: &str, index: usize) -> Vec<String> {
    let mine = |e: &&RecordEntry| e.manifest_digest == manifest_digest && e.layer_index.is_some();
    let per_layer = record.iter().any(|e| mine(&e));
    let mut seen = std::collections::HashSet::new();
    record
        .iter()
        .filter(|e| !per_layer || (mine(e) && e.layer_index == Some(index)))
        .filter(|e| seen.insert(e.path.as_str()))
        .map(|e| e.path.clone())
        .collect()
}

fn read_record(path: &std::path::Path) -> Result<Vec<RecordEntry>, Error> {
    let len = std::fs::metadata(path)?.len();
    if len > MAX_RECORD_BYTES {
        return Err(Error::InvalidArgument(format!(
            "record file {} is {len} bytes; at most {MAX_RECORD_BYTES} are read",
            crate::untrusted::clip(&path.display().to_string())
        )));
    }
    let text = std::fs::read_to_string(path)?;
    let mut out = Vec::new();
    // Go's decoder reads a stream of JSON values: one per line in practice.
    for v in serde_json::Deserializer::from_str(&text).into_iter::<RecordEntry>() {
        out.push(v?);
    }
    Ok(out)
}

/// A stream of a file's bytes in 1 MiB pieces.
fn file_stream(file: tokio::fs::File) -> impl Stream<Item = Result<Bytes, Error>> + Send + 'static {
    futures_util::stream::try_unfold(file, |mut f| async move {
        let mut buf = vec![0u8; 1 << 20];
        let n = f.read(&mut buf).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.truncate(n);
        Ok(Some((Bytes::from(buf), f)))
    })
}

/// Converts image `src` into eStargz (or zstd:chunked) image `dst`; returns the new manifest
/// descriptor.
pub async fn convert(
    cd: &Containerd,
    src: &str,
    dst: &str,
    opts: &ConvertOptions,
    progress: &mut (dyn Write + Send),
) -> Result<Descriptor, Error> {
    let (leased, lease) = cd.with_new_lease().await?;
    let result = convert_in_lease(&leased, src, dst, opts, progress).await;
    if let Err(e) = cd.delete_lease(&lease).await {
        tracing::warn!(lease = %lease, error = %crate::untrusted::chain(&e), "failed to delete lease");
    }
    result
}

/// Image `src` (its record `image`) in containerd's store: the manifest descriptor (this host's
/// entry of an index), the manifest and the image config.
pub(crate) async fn stored_image(
    cd: &Containerd,
    image: &Image,
    src: &str,
) -> Result<(Descriptor, Manifest, serde_json::Value), Error> {
    let mut target = image
        .target
        .as_ref()
        .map(from_pb)
        .ok_or_else(|| Error::NotFound(format!("target of {src}")))?;
    if is_index_type(&target.media_type) {
        let index: Index = serde_json::from_slice(&cd.read_all(&target.digest).await?)?;
        let want = host_platform();
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
    let config = serde_json::from_slice(&cd.read_all(&manifest.config.digest).await?)?;
    Ok((target, manifest, config))
}

async fn convert_in_lease(
    cd: &Containerd,
    src: &str,
    dst: &str,
    opts: &ConvertOptions,
    progress: &mut (dyn Write + Send),
) -> Result<Descriptor, Error> {
    let image = cd.get_image(src).await?;
    let (target, manifest, mut config) = stored_image(cd, &image, src).await?;
    let record = match &opts.record_in {
        Some(p) => read_record(p)?,
        None => Vec::new(),
    };

    let mut converted = Vec::with_capacity(manifest.layers.len());
    let mut diff_ids = Vec::with_capacity(manifest.layers.len());
    for (i, layer) in manifest.layers.iter().enumerate() {
        if !is_layer_type(&layer.media_type) {
            return Err(Error::Unsupported(format!(
                "layer {i} has media type {}",
                layer.media_type
            )));
        }
        if opts.keep_layers.contains(&i) {
            let mut kept = layer.clone();
            if opts.oci && kept.media_type == MEDIA_DOCKER_LAYER_GZIP {
                kept.media_type = MEDIA_OCI_LAYER_GZIP.to_string();
            }
            writeln!(
                progress,
                "layer {}/{} {}: reused without conversion",
                i + 1,
                manifest.layers.len(),
                &layer.digest
            )?;
            let diff_id = config["rootfs"]["diff_ids"][i]
                .as_str()
                .ok_or_else(|| Error::Format(format!("config has no diff ID for layer {i}")))?
                .to_string();
            diff_ids.push(diff_id);
            converted.push(kept);
            continue;
        }
        let files = prioritized_files(&record, &target.digest, i);
        let new = convert_layer(cd, layer, files, opts).await?;
        writeln!(
            progress,
            "layer {}/{} {} -> {} (toc {})",
            i + 1,
            manifest.layers.len(),
            &layer.digest,
            &new.digest,
            new.annotations
                .get(TOC_DIGEST)
                .map(String::as_str)
                .unwrap_or("")
        )?;
        diff_ids.push(
            new.annotations
                .get(UNCOMPRESSED)
                .cloned()
                .unwrap_or_default(),
        );
        converted.push(new);
    }

    config["rootfs"]["diff_ids"] = serde_json::to_value(&diff_ids)?;
    let config_bytes = Bytes::from(serde_json::to_vec(&config)?);
    let config_mt = if opts.oci {
        MEDIA_OCI_CONFIG
    } else if manifest.config.media_type == MEDIA_DOCKER_CONFIG {
        MEDIA_DOCKER_CONFIG
    } else {
        manifest.config.media_type.as_str()
    };
    let config_desc = desc(config_mt, &config_bytes);
    cd.write_bytes(&config_desc, config_bytes, &HashMap::new())
        .await?;

    let mut new_manifest = manifest.clone();
    new_manifest.config = config_desc.clone();
    new_manifest.layers = converted;
    new_manifest.media_type = Some(
        if opts.oci || manifest.media_type.as_deref() == Some(MEDIA_OCI_MANIFEST) {
            MEDIA_OCI_MANIFEST.to_string()
        } else {
            MEDIA_DOCKER_MANIFEST.to_string()
        },
    );
    let manifest_bytes = Bytes::from(serde_json::to_vec(&new_manifest)?);
    let manifest_desc = desc(
        new_manifest
            .media_type
            .as_deref()
            .unwrap_or(MEDIA_OCI_MANIFEST),
        &manifest_bytes,
    );
    let mut labels = HashMap::from([(
        "containerd.io/gc.ref.content.config".to_string(),
        config_desc.digest.clone(),
    )]);
    for (i, l) in new_manifest.layers.iter().enumerate() {
        labels.insert(
            format!("containerd.io/gc.ref.content.l.{i}"),
            l.digest.clone(),
        );
    }
    cd.write_bytes(&manifest_desc, manifest_bytes, &labels)
        .await?;
    cd.put_image(dst, &manifest_desc, &image.labels).await?;
    Ok(manifest_desc)
}

fn desc(media_type: &str, data: &[u8]) -> Descriptor {
    Descriptor {
        media_type: media_type.to_string(),
        digest: sha256_digest(data),
        size: data.len() as i64,
        urls: vec![],
        annotations: Default::default(),
        platform: None,
    }
}

/// Spools one layer out of the content store, builds its eStargz form on a blocking thread,
/// and writes the result back with the TOC digest and diff ID annotations.
async fn convert_layer(
    cd: &Containerd,
    layer: &Descriptor,
    prioritized_files: Vec<String>,
    opts: &ConvertOptions,
) -> Result<Descriptor, Error> {
    let tmp_dir = opts.tmp_dir.clone().unwrap_or_else(std::env::temp_dir);
    let input = tempfile::tempfile_in(&tmp_dir)?;
    let mut input_async = tokio::fs::File::from_std(input.try_clone()?);
    cd.read_to_file(&layer.digest, &mut input_async).await?;
    let output = tempfile::tempfile_in(&tmp_dir)?;
    let build_out = output.try_clone()?;
    let mut build_opts = BuildOptions {
        format: opts.format,
        compression_level: opts.compression_level,
        prioritized_files,
        allow_prioritize_not_found: true,
        tmp_dir: Some(tmp_dir),
        ..BuildOptions::default()
    };
    if opts.chunk_size > 0 {
        build_opts.chunk_size = opts.chunk_size;
    }
    let bar = super::progress::bytes(
        format!("{}: converting", super::rpull::short(&layer.digest)),
        input.metadata()?.len(),
    );
    let reading = bar.clone();
    let result = tokio::task::spawn_blocking(move || {
        use std::io::Seek;
        let mut input = input;
        input.rewind()?;
        let out = std::io::BufWriter::with_capacity(1 << 20, build_out);
        estargz::build(reading.wrap_read(input), out, &build_opts).map_err(Error::Estargz)
    })
    .await
    .map_err(|e| Error::Incomplete(format!("estargz build task: {e}")))??;
    bar.finish_and_clear();

    // zstd:chunked has no Docker media type: its images are OCI (the CLI requires --oci).
    let media_type = if opts.format == Format::ZstdChunked {
        MEDIA_OCI_LAYER_ZSTD
    } else if opts.oci || layer.media_type.starts_with("application/vnd.oci.") {
        MEDIA_OCI_LAYER_GZIP
    } else {
        MEDIA_DOCKER_LAYER_GZIP
    };
    let mut annotations = layer.annotations.clone();
    annotations.insert(TOC_DIGEST.to_string(), result.toc_digest.clone());
    annotations.insert(UNCOMPRESSED.to_string(), result.diff_id.clone());
    annotations.insert(
        UNCOMPRESSED_SIZE.to_string(),
        result.uncompressed_size.to_string(),
    );
    if let Some(m) = &result.zstd_chunked {
        annotations.insert(
            ZSTD_CHUNKED_MANIFEST_CHECKSUM.to_string(),
            m.checksum.clone(),
        );
        annotations.insert(
            ZSTD_CHUNKED_MANIFEST_POSITION.to_string(),
            m.position.clone(),
        );
    }
    let new = Descriptor {
        media_type: media_type.to_string(),
        digest: result.blob_digest.clone(),
        size: result.blob_size as i64,
        urls: vec![],
        annotations,
        platform: None,
    };
    let mut file = tokio::fs::File::from_std(output);
    {
        use tokio::io::AsyncSeekExt;
        file.seek(std::io::SeekFrom::Start(0)).await?;
    }
    let labels = HashMap::from([(UNCOMPRESSED.to_string(), result.diff_id.clone())]);
    cd.write_stream(&new, file_stream(file), &labels).await?;
    Ok(new)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_of_this_image_applies_per_layer() {
        let text = r#"{"path":"usr/bin/python3","manifestDigest":"sha256:m","layerIndex":1}
{"path":"etc/os-release","manifestDigest":"sha256:m","layerIndex":0}
{"path":"usr/bin/python3","manifestDigest":"sha256:m","layerIndex":1}
{"path":"other","manifestDigest":"sha256:x","layerIndex":1}"#;
        let rec: Vec<RecordEntry> = serde_json::Deserializer::from_str(text)
            .into_iter()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(
            prioritized_files(&rec, "sha256:m", 1),
            vec!["usr/bin/python3".to_string()]
        );
        assert_eq!(
            prioritized_files(&rec, "sha256:m", 0),
            vec!["etc/os-release".to_string()]
        );
        assert!(prioritized_files(&rec, "sha256:m", 2).is_empty());
    }

    #[test]
    fn record_of_another_image_applies_to_every_layer_as_go_convert() {
        let text = r#"{"path":"b","manifestDigest":"sha256:x","layerIndex":1}
{"path":"a"}
{"path":"b","manifestDigest":"sha256:x","layerIndex":0}"#;
        let rec: Vec<RecordEntry> = serde_json::Deserializer::from_str(text)
            .into_iter()
            .collect::<Result<_, _>>()
            .unwrap();
        for layer in 0..3 {
            assert_eq!(prioritized_files(&rec, "sha256:m", layer), ["b", "a"]);
        }
    }
}
