//! Finding and reading a layer's TOC through a [`LayerSource`]: the format work (footer, TOC
//! member, digest check, validated index) is `estargz`'s; this only fetches the two ranges.

use crate::estargz::{self, LayerIndex};

use super::source::{fetch_vec, LayerSource};
use super::FsError;

/// Fetches the footer, then the TOC member ([`estargz::read_toc_member`]), and builds the
/// layer's index with [`estargz::open_index_from_toc_member`] (streamed: the TOC is never
/// held whole). `expected_digest`, when given, must match the TOC JSON.
pub fn open_toc(
    src: &dyn LayerSource,
    expected_digest: Option<&str>,
) -> Result<LayerIndex, FsError> {
    let (location, member) = estargz::read_toc_member(src.size(), |offset, len| {
        fetch_vec(src, offset, len).map_err(FsError::Source)
    })?;
    Ok(estargz::open_index_from_toc_member(&member, location, expected_digest)?.0)
}
