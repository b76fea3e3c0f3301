//! `image get-toc-digest`: read a layer's footer and TOC member from containerd's content
//! store (two ranged reads, never the whole blob) and print the TOC digest or the TOC.

use futures_util::StreamExt;

use super::client::Containerd;
use super::Error;
use crate::estargz::{self, EstargzError, Format, TocLocator};

/// What get-toc-digest found.
pub struct LayerToc {
    pub toc: estargz::Toc,
    /// `sha256:` of the uncompressed TOC JSON.
    pub digest: String,
}

async fn read_range(
    cd: &Containerd,
    digest: &str,
    offset: u64,
    len: u64,
) -> Result<Vec<u8>, Error> {
    let mut out = Vec::with_capacity(len as usize);
    let mut s = std::pin::pin!(cd.read_stream(digest, offset as i64, len as i64).await?);
    while let Some(chunk) = s.next().await {
        out.extend_from_slice(&chunk?);
    }
    if out.len() as u64 != len {
        return Err(Error::Incomplete(format!(
            "read {len} bytes at {offset} of {digest}"
        )));
    }
    Ok(out)
}

/// Reads footer and TOC of a layer stored in containerd, which must be in `format` (eStargz
/// or legacy stargz for [`Format::Gzip`]; Go's get-toc-digest also parses only the format it
/// is told).
pub async fn layer_toc(cd: &Containerd, digest: &str, format: Format) -> Result<LayerToc, Error> {
    let info = cd
        .content_info(digest)
        .await?
        .ok_or_else(|| Error::NotFound(format!("content {digest}")))?;
    let size = u64::try_from(info.size).unwrap_or(0);
    // containerd's content API is async, so this drives the locator itself.
    let locator = TocLocator::new(size);
    let tail = locator.footer_range();
    let tail = read_range(cd, digest, tail.start, tail.end - tail.start).await?;
    let (location, range) = locator.locate(&tail).map_err(|e| match e {
        EstargzError::TocTooLarge { .. } => Error::Format(format!("TOC of {digest} is too large")),
        e => Error::Estargz(e),
    })?;
    if location.format != format {
        return Err(Error::Format(match location.format {
            Format::ZstdChunked => format!("{digest} is a zstd:chunked layer (see --zstdchunked)"),
            Format::Gzip => format!("{digest} is an eStargz layer, not zstd:chunked"),
        }));
    }
    let member = read_range(cd, digest, range.start, range.end - range.start).await?;
    let (toc, digest) = estargz::parse_toc_member(&member, format).map_err(Error::Estargz)?;
    Ok(LayerToc { toc, digest })
}
