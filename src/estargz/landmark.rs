//! Landmark files: tell the filesystem what to prefetch (Go `estargz.PrefetchLandmark`).

/// Everything in the blob before this entry's payload is prefetched in one range request.
pub const PREFETCH_LANDMARK: &str = ".prefetch.landmark";
/// Present when the layer was optimized but nothing should be prefetched.
pub const NO_PREFETCH_LANDMARK: &str = ".no.prefetch.landmark";
/// The one byte a landmark file contains.
pub const LANDMARK_CONTENTS: u8 = 0x0f;

/// True for the landmark names (after normalization); the index hides them from the tree.
pub fn is_landmark(normalized_name: &str) -> bool {
    normalized_name == PREFETCH_LANDMARK || normalized_name == NO_PREFETCH_LANDMARK
}
