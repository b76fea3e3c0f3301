//! `image get-toc-digest`: read a layer's footer and TOC member from containerd's content
//! store (two ranged reads, never the whole blob) and print the TOC digest or the TOC.

use futures_util::StreamExt;

use super::client::Containerd;
use super::Error;
use crate::estargz::{self, FOOTER_SIZE};

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

/// Reads footer and TOC of an eStargz (or legacy stargz) layer stored in containerd.
pub async fn layer_toc(cd: &Containerd, digest: &str) -> Result<LayerToc, Error> {
    let info = cd
        .content_info(digest)
        .await?
        .ok_or_else(|| Error::NotFound(format!("content {digest}")))?;
    let size = u64::try_from(info.size).unwrap_or(0);
    let tail_len = size.min(FOOTER_SIZE);
    let tail = read_range(cd, digest, size - tail_len, tail_len).await?;
    let loc = estargz::parse_footer(&tail).map_err(Error::Estargz)?;
    let range = loc.toc_range(size).map_err(Error::Estargz)?;
    if range.end - range.start > estargz::toc::MAX_TOC_COMPRESSED_SIZE {
        return Err(Error::Format(format!("TOC of {digest} is too large")));
    }
    let member = read_range(cd, digest, range.start, range.end - range.start).await?;
    let (toc, digest) = estargz::parse_toc_member(&member).map_err(Error::Estargz)?;
    Ok(LayerToc { toc, digest })
}
