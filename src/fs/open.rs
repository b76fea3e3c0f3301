//! Finding and reading a layer's TOC through a [`LayerSource`]: footer → TOC member → JSON.
//!
//! Kept in `fs` as a thin reader so a layer can be mounted from any source; the format rules
//! (eStargz footer first, then legacy stargz) are those of `shared/REFERENCE.md`.

use std::io::Read;

use sha2::{Digest as _, Sha256};

use crate::estargz::toc::TOC_TAR_NAME;
use crate::estargz::Toc;

use super::source::{fetch_vec, LayerSource};
use super::FsError;

const ESTARGZ_FOOTER: u64 = 51;
const LEGACY_FOOTER: u64 = 47;
/// A TOC bigger than this is refused rather than buffered.
const MAX_TOC_BYTES: u64 = 512 << 20;

/// A parsed TOC and where it sits.
#[derive(Debug)]
pub struct OpenedToc {
    pub toc: Toc,
    /// Blob offset of the TOC's gzip member (the end of the last payload).
    pub toc_offset: u64,
    /// `sha256:<hex>` of the uncompressed TOC JSON.
    pub toc_digest: String,
}

/// Reads the footer and the TOC. `expected_digest`, when given, must match the TOC JSON.
pub fn open_toc(src: &dyn LayerSource, expected_digest: Option<&str>) -> Result<OpenedToc, FsError> {
    let size = src.size();
    if size < LEGACY_FOOTER {
        return Err(FsError::Format(format!("blob of {size} bytes is too small for a footer")));
    }
    let tail_len = ESTARGZ_FOOTER.min(size);
    let tail = fetch_vec(src, size - tail_len, tail_len).map_err(FsError::Source)?;
    let (toc_offset, footer_len) = parse_footer(&tail)?;
    let toc_end = size - footer_len;
    if toc_offset >= toc_end || toc_end - toc_offset > MAX_TOC_BYTES {
        return Err(FsError::Format(format!("TOC offset {toc_offset} out of range (blob {size})")));
    }
    let member = fetch_vec(src, toc_offset, toc_end - toc_offset).map_err(FsError::Source)?;
    let json = toc_json(&member)?;
    let toc_digest = format!("sha256:{}", hex::encode(Sha256::digest(&json)));
    if let Some(want) = expected_digest {
        if want != toc_digest {
            return Err(FsError::Verify(format!("TOC digest {toc_digest} does not match {want}")));
        }
    }
    let toc: Toc = serde_json::from_slice(&json).map_err(|e| FsError::Format(format!("TOC JSON: {e}")))?;
    Ok(OpenedToc { toc, toc_offset, toc_digest })
}

/// Returns `(toc_offset, footer_len)`, trying eStargz then legacy stargz.
fn parse_footer(tail: &[u8]) -> Result<(u64, u64), FsError> {
    let n = tail.len();
    let hex_offset = |b: &[u8]| -> Option<u64> { u64::from_str_radix(std::str::from_utf8(b).ok()?, 16).ok() };
    if n >= ESTARGZ_FOOTER as usize {
        let f = &tail[n - ESTARGZ_FOOTER as usize..];
        if f[..4] == [0x1f, 0x8b, 8, 4] && f[10..16] == [26, 0, b'S', b'G', 22, 0] && &f[32..38] == b"STARGZ" {
            if let Some(off) = hex_offset(&f[16..32]) {
                return Ok((off, ESTARGZ_FOOTER));
            }
        }
    }
    let f = &tail[n - LEGACY_FOOTER as usize..];
    if f[..4] == [0x1f, 0x8b, 8, 4] && f[10..12] == [22, 0] && &f[28..34] == b"STARGZ" {
        if let Some(off) = hex_offset(&f[12..28]) {
            return Ok((off, LEGACY_FOOTER));
        }
    }
    Err(FsError::Format("no eStargz or stargz footer".into()))
}

/// Gunzips the TOC member and returns the bytes of its single tar entry.
fn toc_json(member: &[u8]) -> Result<Vec<u8>, FsError> {
    let dec = flate2::read::MultiGzDecoder::new(member);
    let mut ar = tar::Archive::new(dec);
    let mut entries = ar.entries().map_err(|e| FsError::Format(format!("TOC tar: {e}")))?;
    let mut ent = entries
        .next()
        .ok_or_else(|| FsError::Format("empty TOC member".into()))?
        .map_err(|e| FsError::Format(format!("TOC tar: {e}")))?;
    let path = ent.path_bytes().into_owned();
    if path != TOC_TAR_NAME.as_bytes() {
        return Err(FsError::Format(format!("TOC entry is named {:?}", String::from_utf8_lossy(&path))));
    }
    let mut json = Vec::new();
    (&mut ent).take(MAX_TOC_BYTES).read_to_end(&mut json).map_err(|e| FsError::Format(format!("TOC: {e}")))?;
    Ok(json)
}
