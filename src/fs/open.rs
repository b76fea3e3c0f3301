//! Finding and reading a layer's TOC through a [`LayerSource`]: the format work (footer, TOC
//! member, digest check, validated index) is `estargz`'s; this only fetches the two ranges.

use crate::estargz::toc::MAX_TOC_COMPRESSED_SIZE;
use crate::estargz::{self, EstargzError, LayerIndex, MAX_FOOTER_SIZE};

use super::source::{fetch_vec, LayerSource};
use super::FsError;

/// Fetches the footer, then the TOC member, and builds the layer's index with
/// [`estargz::open_index_from_toc_member`] (streamed: the TOC is never held whole).
/// `expected_digest`, when given, must match the TOC JSON.
pub fn open_toc(
    src: &dyn LayerSource,
    expected_digest: Option<&str>,
) -> Result<LayerIndex, FsError> {
    let size = src.size();
    let tail_len = MAX_FOOTER_SIZE.min(size);
    let tail = fetch_vec(src, size - tail_len, tail_len).map_err(FsError::Source)?;
    let location = estargz::parse_footer(&tail)?;
    let range = location.toc_range(size)?;
    let len = range.end - range.start;
    if len > MAX_TOC_COMPRESSED_SIZE {
        return Err(EstargzError::TocTooLarge {
            size: len,
            limit: MAX_TOC_COMPRESSED_SIZE,
        }
        .into());
    }
    let member = fetch_vec(src, range.start, len).map_err(FsError::Source)?;
    Ok(estargz::open_index_from_toc_member(&member, location, expected_digest)?.0)
}
