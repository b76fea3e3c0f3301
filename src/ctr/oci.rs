//! The few OCI / Docker image-spec types `ctr-remote` reads and writes.
//!
//! Unknown JSON fields are kept (`extra`) so a manifest we rewrite in `convert` loses nothing.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

pub const MT_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const MT_DOCKER_MANIFEST_LIST: &str =
    "application/vnd.docker.distribution.manifest.list.v2+json";
pub const MT_DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
pub const MT_DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
pub const MT_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MT_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const MT_OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const MT_OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

/// Layer annotation carrying the digest of the eStargz TOC JSON.
pub const ANN_TOC_DIGEST: &str = "containerd.io/snapshot/stargz/toc.digest";
/// Layer annotation carrying the layer's diff ID (digest of the uncompressed tar).
pub const ANN_UNCOMPRESSED: &str = "containerd.io/uncompressed";

/// A content descriptor, as in image-spec `descriptor.md`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Descriptor {
    #[serde(rename = "mediaType")]
    pub media_type: String,
    pub digest: String,
    pub size: i64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub urls: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Platform {
    pub architecture: String,
    pub os: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

/// An image manifest (OCI or Docker schema 2).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    #[serde(rename = "schemaVersion")]
    pub schema_version: u32,
    #[serde(rename = "mediaType", default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

/// An image index / manifest list.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Index {
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
                | MT_DOCKER_LAYER_GZIP
                | "application/vnd.docker.image.rootfs.foreign.diff.tar"
                | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
        )
}

pub fn is_index_type(media_type: &str) -> bool {
    media_type == MT_OCI_INDEX || media_type == MT_DOCKER_MANIFEST_LIST
}

/// `sha256:<hex>` of `data`.
pub fn sha256_digest(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// The standard chain IDs (image-spec `config.md`): `chain[0] = diff[0]`,
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
        assert!(is_layer_type(MT_OCI_LAYER_GZIP));
        assert!(is_layer_type("application/vnd.oci.image.layer.v1.tar+zstd"));
        assert!(is_layer_type(MT_DOCKER_LAYER_GZIP));
        assert!(!is_layer_type(MT_OCI_CONFIG));
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
}
