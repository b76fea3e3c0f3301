//! Snapshot labels `rpull` hands to the `stargz` snapshotter, as Go's
//! `source.AppendDefaultLabelsHandlerWrapper` and containerd's unpacker compute them.
//! The names themselves are [`crate::labels`]'.

use std::collections::HashMap;

use crate::labels::{
    GID_MAPPING, INHERITED_PREFIX, REMOTE_URLS, SNAPSHOT_REF, STARGZ_DIGEST, STARGZ_LAYERS,
    STARGZ_PREFETCH, STARGZ_REFERENCE, UID_MAPPING,
};
use crate::oci::{is_layer_type, Descriptor};

/// containerd's `labels.Validate`: key plus value at most 4096 bytes.
const MAX_LABEL_SIZE: usize = 4096;

/// The prefetch size Go's `ctr-remote rpull` always passes (10 MiB).
pub const DEFAULT_PREFETCH_SIZE: u64 = 10 * 1024 * 1024;

/// Adds the stargz default annotations to every layer of a manifest, exactly as Go's
/// wrapper does: the layers label lists this layer and the ones *after* it, cut where the
/// label would exceed containerd's size limit (only costs prefetch, never correctness).
pub fn append_default_labels(image_ref: &str, layers: &mut [Descriptor], prefetch_size: u64) {
    let digests: Vec<(bool, String)> = layers
        .iter()
        .map(|l| (is_layer_type(&l.media_type), l.digest.clone()))
        .collect();
    for (i, layer) in layers.iter_mut().enumerate() {
        if !is_layer_type(&layer.media_type) {
            continue;
        }
        let mut list = String::new();
        for (is_layer, d) in &digests[i..] {
            if !is_layer {
                continue;
            }
            let item = format!("{d},");
            if STARGZ_LAYERS.len() + list.len() + item.len() > MAX_LABEL_SIZE {
                break;
            }
            list.push_str(&item);
        }
        let list = list.trim_end_matches(',').to_string();
        let ann = &mut layer.annotations;
        ann.insert(STARGZ_REFERENCE.to_string(), image_ref.to_string());
        ann.insert(STARGZ_DIGEST.to_string(), layer.digest.clone());
        ann.insert(STARGZ_LAYERS.to_string(), list);
        ann.insert(STARGZ_PREFETCH.to_string(), prefetch_size.to_string());
        if !layer.urls.is_empty() {
            ann.insert(REMOTE_URLS.to_string(), layer.urls.join(","));
        }
    }
}

/// The labels containerd's unpacker gives Prepare/Commit for one layer: the inherited
/// annotations, the target chain ID, and any extra snapshot options (skip-verify).
pub fn snapshot_labels(
    layer: &Descriptor,
    chain_id: &str,
    extra: &HashMap<String, String>,
) -> HashMap<String, String> {
    let mut labels: HashMap<String, String> = layer
        .annotations
        .iter()
        .filter(|(k, _)| k.starts_with(INHERITED_PREFIX) || *k == UID_MAPPING || *k == GID_MAPPING)
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    labels.extend(extra.iter().map(|(k, v)| (k.clone(), v.clone())));
    labels.insert(SNAPSHOT_REF.to_string(), chain_id.to_string());
    labels
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::labels::STARGZ_SKIP_VERIFY;
    use crate::oci::{MEDIA_OCI_CONFIG, MEDIA_OCI_LAYER_GZIP};

    fn layer(d: &str) -> Descriptor {
        Descriptor {
            media_type: MEDIA_OCI_LAYER_GZIP.into(),
            digest: d.into(),
            size: 1,
            urls: vec![],
            annotations: Default::default(),
            platform: None,
        }
    }

    #[test]
    fn layers_label_lists_this_and_following_layers() {
        let mut layers = vec![layer("sha256:a"), layer("sha256:b"), layer("sha256:c")];
        append_default_labels("reg/x:1", &mut layers, DEFAULT_PREFETCH_SIZE);
        assert_eq!(
            layers[0].annotations[STARGZ_LAYERS],
            "sha256:a,sha256:b,sha256:c"
        );
        assert_eq!(layers[1].annotations[STARGZ_LAYERS], "sha256:b,sha256:c");
        assert_eq!(layers[2].annotations[STARGZ_LAYERS], "sha256:c");
        assert_eq!(layers[1].annotations[STARGZ_DIGEST], "sha256:b");
        assert_eq!(layers[1].annotations[STARGZ_REFERENCE], "reg/x:1");
        assert_eq!(layers[1].annotations[STARGZ_PREFETCH], "10485760");
        assert!(!layers[1].annotations.contains_key(REMOTE_URLS));
    }

    #[test]
    fn layers_label_is_truncated_to_the_label_limit() {
        let mut layers: Vec<Descriptor> = (0..100)
            .map(|i| layer(&format!("sha256:{:064x}", i)))
            .collect();
        append_default_labels("r", &mut layers, 0);
        let l = &layers[0].annotations[STARGZ_LAYERS];
        assert!(STARGZ_LAYERS.len() + l.len() < MAX_LABEL_SIZE);
        assert!(l.starts_with(&layers[0].digest));
        assert!(!l.ends_with(','));
        assert_eq!(
            l.split(',').count(),
            (MAX_LABEL_SIZE - STARGZ_LAYERS.len()) / 72
        );
    }

    #[test]
    fn non_layers_are_left_alone_and_labels_filtered() {
        let mut cfg = layer("sha256:cfg");
        cfg.media_type = MEDIA_OCI_CONFIG.into();
        let mut layers = vec![cfg, layer("sha256:a")];
        layers[1]
            .annotations
            .insert("org.opencontainers.x".into(), "no".into());
        layers[1].annotations.insert(
            "containerd.io/snapshot/stargz/toc.digest".into(),
            "sha256:t".into(),
        );
        append_default_labels("r", &mut layers, 0);
        assert!(layers[0].annotations.is_empty());
        let extra = HashMap::from([(STARGZ_SKIP_VERIFY.to_string(), "true".to_string())]);
        let labels = snapshot_labels(&layers[1], "sha256:chain", &extra);
        assert_eq!(labels[SNAPSHOT_REF], "sha256:chain");
        assert_eq!(
            labels["containerd.io/snapshot/stargz/toc.digest"],
            "sha256:t"
        );
        assert_eq!(labels[STARGZ_SKIP_VERIFY], "true");
        assert!(!labels.contains_key("org.opencontainers.x"));
        assert_eq!(labels[STARGZ_LAYERS], "sha256:a");
    }
}
