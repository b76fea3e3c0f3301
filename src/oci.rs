//! The OCI / Docker image model shared by the daemon ([`crate::remote`] resolves images with
//! it) and `ctr-remote` ([`crate::ctr`] reads, rewrites and stores images with it):
//! descriptors, manifests, indexes, platforms, media types and the `sha256:` digest spelling.
//!
//! It sits at the crate root rather than in `remote` or `ctr` because neither owns the other,
//! and `estargz` needs the digest helper too.
//!
//! Parsing is as lenient as Go's `encoding/json` into `ocispec` types: a missing field takes
//! its zero value, so anything either side accepted before still parses. Unknown manifest
//! fields are kept (`extra`), so a manifest `convert` rewrites loses nothing.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

pub const MEDIA_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const MEDIA_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MEDIA_OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const MEDIA_OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const MEDIA_OCI_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
pub const MEDIA_DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const MEDIA_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const MEDIA_DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
pub const MEDIA_DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";

/// A content descriptor. Annotations are ordered so that a manifest we write is
/// byte-for-byte reproducible (its digest is its name).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Descriptor {
    #[serde(rename = "mediaType", default)]
    pub media_type: String,
    pub digest: String,
    /// Signed as in Go and containerd's API; nothing here trusts it for an allocation.
    #[serde(default)]
    pub size: i64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub urls: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
}

/// The `platform` of an index entry.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Platform {
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub os: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

/// An image manifest (OCI or Docker schema 2). Field order is Go's, so a rewritten manifest
/// serializes as Go's would.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    #[serde(rename = "schemaVersion", default)]
    pub schema_version: u32,
    #[serde(rename = "mediaType", default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    pub config: Descriptor,
    #[serde(default)]
    pub layers: Vec<Descriptor>,
    /// Every other field (`annotations`, `subject`, ...), kept as served.
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

/// An image index / manifest list; only read, never rewritten.
#[derive(Debug, Clone, Deserialize)]
pub struct Index {
    #[serde(default)]
    pub manifests: Vec<Descriptor>,
}

/// The part of an image config we need; the rest stays in `extra`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Config {
    pub rootfs: RootFs,
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RootFs {
    #[serde(rename = "type")]
    pub kind: String,
    pub diff_ids: Vec<String>,
}

/// Mirrors containerd's `images.IsLayerType`.
pub fn is_layer_type(media_type: &str) -> bool {
    media_type.starts_with("application/vnd.oci.image.layer.")
        || matches!(
            media_type,
            "application/vnd.docker.image.rootfs.diff.tar"
                | MEDIA_DOCKER_LAYER_GZIP
                | "application/vnd.docker.image.rootfs.foreign.diff.tar"
                | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
        )
}

/// An OCI index or a Docker manifest list.
pub fn is_index_type(media_type: &str) -> bool {
    media_type == MEDIA_OCI_INDEX || media_type == MEDIA_DOCKER_LIST
}

/// `sha256:<lowercase hex>` of `data`: the digest spelling of descriptors and of the TOC.
pub fn sha256_digest(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// The image spec's chain IDs: `chain[0] = diff[0]`,
/// `chain[n] = sha256(chain[n-1] + " " + diff[n])`.
pub fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(diff_ids.len());
    for d in diff_ids {
        let next = match out.last() {
            None => d.clone(),
            Some(parent) => sha256_digest(format!("{parent} {d}").as_bytes()),
        };
        out.push(next);
    }
    out
}

/// The platform of this host in OCI terms (GOARCH names).
pub fn host_platform() -> Platform {
    let architecture = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    };
    Platform {
        architecture: architecture.to_string(),
        os: "linux".to_string(),
        variant: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_digest_is_the_oci_spelling() {
        assert_eq!(
            sha256_digest(b""),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn chain_ids_follow_image_spec() {
        let diffs = vec![
            "sha256:aaaa".to_string(),
            "sha256:bbbb".to_string(),
            "sha256:cccc".to_string(),
        ];
        let chain = chain_ids(&diffs);
        assert_eq!(chain[0], "sha256:aaaa");
        assert_eq!(chain[1], sha256_digest(b"sha256:aaaa sha256:bbbb"));
        assert_eq!(
            chain[2],
            sha256_digest(format!("{} sha256:cccc", chain[1]).as_bytes())
        );
    }

    #[test]
    fn layer_types() {
        assert!(is_layer_type(MEDIA_OCI_LAYER_GZIP));
        assert!(is_layer_type("application/vnd.oci.image.layer.v1.tar+zstd"));
        assert!(is_layer_type(MEDIA_DOCKER_LAYER_GZIP));
        assert!(!is_layer_type(MEDIA_OCI_CONFIG));
        assert!(is_index_type(MEDIA_DOCKER_LIST));
        assert!(!is_index_type(MEDIA_OCI_MANIFEST));
    }

    #[test]
    fn manifest_round_trip_keeps_unknown_fields() {
        let json = r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json",
            "config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:00","size":1},
            "layers":[],"annotations":{"a":"b"}}"#;
        let m: Manifest = serde_json::from_str(json).unwrap();
        let back = serde_json::to_value(&m).unwrap();
        assert_eq!(back["annotations"]["a"], "b");
    }

    /// Field order and omissions are what Go's `json.Marshal` of `ocispec.Manifest` writes, so
    /// a converted image's manifest digest does not depend on which tool converted it.
    #[test]
    fn manifest_serializes_in_go_field_order() {
        let json = r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:c","size":3},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:l","size":7,"annotations":{"a":"1","b":"2"}}],"annotations":{"x":"y"}}"#;
        let m: Manifest = serde_json::from_str(json).unwrap();
        assert_eq!(serde_json::to_string(&m).unwrap(), json);
    }

    /// What the daemon's and `ctr-remote`'s models each accepted still parses: descriptors
    /// without media type or size, manifests without schema version or layers, index entries
    /// with partial platforms.
    #[test]
    fn missing_fields_take_zero_values() {
        let m: Manifest = serde_json::from_str(r#"{"config":{"digest":"sha256:c"}}"#).unwrap();
        assert_eq!(m.schema_version, 0);
        assert_eq!(m.config.media_type, "");
        assert_eq!(m.config.size, 0);
        assert!(m.layers.is_empty());
        let i: Index = serde_json::from_str(
            r#"{"manifests":[{"digest":"sha256:m","platform":{"os":"linux"}}]}"#,
        )
        .unwrap();
        let p = i.manifests[0].platform.as_ref().unwrap();
        assert_eq!((p.os.as_str(), p.architecture.as_str()), ("linux", ""));
        let empty: Index = serde_json::from_str("{}").unwrap();
        assert!(empty.manifests.is_empty());
        assert!(serde_json::from_str::<Descriptor>(r#"{"size":1}"#).is_err());
    }
}
