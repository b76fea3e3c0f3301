//! Every label and annotation name the snapshotter and `ctr-remote` agree on, in one place:
//! `ctr-remote` (and containerd's CRI plugin) write them, the daemon reads them. The values are
//! Go's, byte for byte, so either side can be swapped for the Go tool.

/// Set by containerd's unpacker on Prepare: the key the snapshot is committed as.
pub const SNAPSHOT_REF: &str = "containerd.io/snapshot.ref";
/// Put by the snapshotter on snapshots backed by a remote (FUSE) layer.
pub const REMOTE: &str = "containerd.io/snapshot/remote";
/// Value of [`REMOTE`], as the Go snapshotter writes it.
pub const REMOTE_VALUE: &str = "remote snapshot";

/// The image reference, as containerd's CRI plugin passes it (read before [`STARGZ_REFERENCE`]).
pub const CRI_IMAGE_REF: &str = "containerd.io/snapshot/cri.image-ref";
/// The layer digest, as containerd's CRI plugin passes it (read before [`STARGZ_DIGEST`]).
pub const CRI_LAYER_DIGEST: &str = "containerd.io/snapshot/cri.layer-digest";

/// Every layer digest of the image, comma-separated, as containerd's CRI plugin passes it (read
/// before [`STARGZ_LAYERS`]).
pub const CRI_IMAGE_LAYERS: &str = "containerd.io/snapshot/cri.image-layers";

/// The image reference of the layer (Go's `TargetRefLabel`).
pub const STARGZ_REFERENCE: &str = "containerd.io/snapshot/remote/stargz.reference";
/// The layer's blob digest.
pub const STARGZ_DIGEST: &str = "containerd.io/snapshot/remote/stargz.digest";
/// This layer's digest and those after it, comma-separated (prefetch hint).
pub const STARGZ_LAYERS: &str = "containerd.io/snapshot/remote/stargz.layers";
/// Bytes of the blob to prefetch when mounting.
pub const STARGZ_PREFETCH: &str = "containerd.io/snapshot/remote/stargz.prefetch";
/// Present when the TOC digest is not to be checked (`rpull --skip-content-verify`).
pub const STARGZ_SKIP_VERIFY: &str = "containerd.io/snapshot/remote/stargz.skipverify";
/// The layer descriptor's `urls`, comma-separated.
pub const REMOTE_URLS: &str = "containerd.io/snapshot/remote/urls";

/// Layer annotation and snapshot label: `sha256:` of the layer's uncompressed TOC JSON.
pub const TOC_DIGEST: &str = "containerd.io/snapshot/stargz/toc.digest";
/// Layer annotation and content label: the layer's diff ID (digest of the uncompressed tar).
pub const UNCOMPRESSED: &str = "containerd.io/uncompressed";
/// Layer annotation of eStargz converters (Go's `StoreUncompressedSizeAnnotation`): the size
/// of the decompressed blob, in decimal.
pub const UNCOMPRESSED_SIZE: &str = "io.containers.estargz.uncompressed-size";
/// zstd:chunked layer annotation (containers/storage): `sha256:` of the compressed TOC.
pub const ZSTD_CHUNKED_MANIFEST_CHECKSUM: &str = "io.containers.zstd-chunked.manifest-checksum";
/// zstd:chunked layer annotation: `offset:compressed size:uncompressed size:1` of the TOC.
pub const ZSTD_CHUNKED_MANIFEST_POSITION: &str = "io.containers.zstd-chunked.manifest-position";

/// containerd passes layer annotations with this prefix to the snapshotter as labels
/// (`snapshots.FilterInheritedLabels`), and the two mapping labels besides.
pub const INHERITED_PREFIX: &str = "containerd.io/snapshot/";
pub const UID_MAPPING: &str = "containerd.io/snapshot/uidmapping";
pub const GID_MAPPING: &str = "containerd.io/snapshot/gidmapping";

#[cfg(test)]
mod tests {
    use super::*;

    /// `ctr-remote` hands these to the snapshotter as layer annotations; containerd forwards
    /// only annotations under [`INHERITED_PREFIX`], so each must be under it.
    #[test]
    fn annotations_for_the_snapshotter_are_inherited() {
        for l in [
            STARGZ_REFERENCE,
            STARGZ_DIGEST,
            STARGZ_LAYERS,
            STARGZ_PREFETCH,
            REMOTE_URLS,
            TOC_DIGEST,
        ] {
            assert!(l.starts_with(INHERITED_PREFIX), "{l}");
        }
        assert!(!UNCOMPRESSED.starts_with(INHERITED_PREFIX));
    }
}
