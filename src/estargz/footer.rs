//! The footer: the last bytes of a blob, which say where its TOC is.
//!
//! eStargz (51 bytes): an empty gzip member whose FEXTRA field is XLEN=26, subfield `S`,`G`,
//! LEN=22, data `%016x` + `STARGZ`.
//! Legacy stargz (47 bytes): the same member with XLEN=22, the 22 bytes `%016xSTARGZ` directly.
//! zstd:chunked (40 bytes, the body of a zstd skippable frame): little-endian u64 TOC offset,
//! compressed TOC size, uncompressed TOC size, manifest type (1), then `GnUlInUx`.
//! Readers try eStargz, then legacy, then zstd:chunked, like Go's `estargz.Open` with the
//! snapshotter's decompressors.
//!
//! [`TocLocator`] is the one footer → TOC locator: every reader of a blob (the filesystem,
//! `ctr-remote`, [`super::reader::open_blob`]) finds and bounds the TOC member through it.

use std::ops::Range;

use super::toc::MAX_TOC_COMPRESSED_SIZE;
use super::{EstargzError, Result};

/// Size of the eStargz footer.
pub const FOOTER_SIZE: u64 = 51;
/// Size of the legacy stargz footer.
pub const LEGACY_FOOTER_SIZE: u64 = 47;
/// Size of the zstd:chunked footer (without the 8-byte skippable frame header before it).
pub const ZSTD_FOOTER_SIZE: u64 = 40;
/// Fetch at least this many tail bytes to be able to parse any of the footers.
pub const MAX_FOOTER_SIZE: u64 = FOOTER_SIZE;

const MAGIC: &[u8; 6] = b"STARGZ";
const GZIP_ID: [u8; 3] = [0x1f, 0x8b, 0x08];
const FEXTRA: u8 = 0x04;
/// Stored, final, empty deflate block followed by CRC32=0 and ISIZE=0: the body of an empty member.
const EMPTY_BODY: [u8; 13] = [0x01, 0x00, 0x00, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 0];

/// How a blob's chunks and TOC are compressed; the footer tells which.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Format {
    /// eStargz (and legacy stargz): gzip members; the TOC is a tar entry in the last one.
    #[default]
    Gzip,
    /// zstd:chunked: zstd frames; the TOC is zstd-compressed JSON in a skippable frame.
    ZstdChunked,
}

/// Where the TOC is, as the footer says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TocLocation {
    /// Blob offset of the TOC: the gzip member, or the compressed JSON in its skippable frame.
    pub toc_offset: u64,
    /// Size of the footer that was found (51, 47 or 40).
    pub footer_size: u64,
    /// True when the legacy stargz footer was found.
    pub legacy: bool,
    pub format: Format,
    /// zstd:chunked only: the compressed TOC's size, from the footer (a gzip TOC member runs
    /// up to the footer).
    pub toc_size: Option<u64>,
}

impl TocLocation {
    /// The blob range of the TOC: `[toc_offset, blob_size - footer_size)` for gzip, the
    /// footer's size from `toc_offset` for zstd:chunked, which must end before the footer's
    /// skippable frame header. Errors when the footer points outside the blob or at an empty
    /// range.
    pub fn toc_range(&self, blob_size: u64) -> Result<Range<u64>> {
        let end = blob_size.checked_sub(self.footer_size);
        let range = match (self.toc_size, end) {
            (None, Some(end)) => Some(self.toc_offset..end),
            (Some(size), Some(end)) => self
                .toc_offset
                .checked_add(size)
                .filter(|&e| e <= end.saturating_sub(SKIPPABLE_HEADER_SIZE))
                .map(|e| self.toc_offset..e),
            (_, None) => None,
        };
        match range {
            Some(r) if r.start < r.end => Ok(r),
            _ => Err(EstargzError::TocOutOfRange {
                toc_offset: self.toc_offset,
                blob_size,
                footer_size: self.footer_size,
            }),
        }
    }

    /// Where the chunks end: the TOC member for gzip; for zstd:chunked the skippable frame
    /// header in front of the TOC (its 8 bytes are no chunk's).
    pub fn payload_end(&self) -> u64 {
        match self.format {
            Format::Gzip => self.toc_offset,
            Format::ZstdChunked => self.toc_offset.saturating_sub(SKIPPABLE_HEADER_SIZE),
        }
    }
}

/// Finds the TOC member of a blob of known size: which tail to fetch, then, from that tail,
/// where the member is. It does no I/O itself, so each caller keeps its own (a positional
/// reader, a layer source, containerd's async content API); [`read_toc_member`] drives it
/// for synchronous readers. The member's size is checked against
/// [`MAX_TOC_COMPRESSED_SIZE`] before anyone fetches it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TocLocator {
    blob_size: u64,
}

impl TocLocator {
    pub fn new(blob_size: u64) -> Self {
        TocLocator { blob_size }
    }

    /// The tail that holds either footer: the last [`MAX_FOOTER_SIZE`] bytes, or the whole
    /// blob when it is smaller (then [`TocLocator::locate`] reports it as too small).
    pub fn footer_range(&self) -> Range<u64> {
        self.blob_size - MAX_FOOTER_SIZE.min(self.blob_size)..self.blob_size
    }

    /// Parses the footer in `tail` (the bytes of [`TocLocator::footer_range`]) and returns it
    /// with the blob range of the TOC member, refusing a member over
    /// [`MAX_TOC_COMPRESSED_SIZE`].
    pub fn locate(&self, tail: &[u8]) -> Result<(TocLocation, Range<u64>)> {
        let location = parse_footer(tail)?;
        let range = location.toc_range(self.blob_size)?;
        let size = range.end - range.start;
        if size > MAX_TOC_COMPRESSED_SIZE {
            return Err(EstargzError::TocTooLarge {
                size,
                limit: MAX_TOC_COMPRESSED_SIZE,
            });
        }
        Ok((location, range))
    }
}

/// Fetches the TOC member of a blob of `blob_size` bytes with two calls to
/// `read(offset, len)`, which must return exactly `len` bytes or fail: the tail, then the
/// member [`TocLocator`] found there. `read`'s errors are returned as they are; the format's
/// are converted into the caller's error type.
pub fn read_toc_member<E: From<EstargzError>>(
    blob_size: u64,
    mut read: impl FnMut(u64, u64) -> std::result::Result<Vec<u8>, E>,
) -> std::result::Result<(TocLocation, Vec<u8>), E> {
    let locator = TocLocator::new(blob_size);
    let tail = locator.footer_range();
    let tail = read(tail.start, tail.end - tail.start)?;
    let (location, range) = locator.locate(&tail)?;
    let member = read(range.start, range.end - range.start)?;
    Ok((location, member))
}

/// The 51-byte eStargz footer pointing at `toc_offset`, byte-identical to Go's `footerBytes`
/// (gzip header with MTIME=0, XFL=0, OS=255, and an empty stored deflate block).
pub fn footer_bytes(toc_offset: u64) -> [u8; FOOTER_SIZE as usize] {
    let mut out = [0u8; FOOTER_SIZE as usize];
    out[..3].copy_from_slice(&GZIP_ID);
    out[3] = FEXTRA;
    // bytes 4..8 MTIME = 0, byte 8 XFL = 0
    out[9] = 0xff;
    out[10..12].copy_from_slice(&26u16.to_le_bytes());
    out[12] = b'S';
    out[13] = b'G';
    out[14..16].copy_from_slice(&22u16.to_le_bytes());
    let hexoff = format!("{toc_offset:016x}");
    out[16..32].copy_from_slice(&hexoff.as_bytes()[..16]);
    out[32..38].copy_from_slice(MAGIC);
    out[38..].copy_from_slice(&EMPTY_BODY);
    out
}

/// Parses the footer from the last bytes of a blob (`tail` must hold at least the footer; more
/// is fine). Tries the 51-byte eStargz layout, then the 47-byte legacy one, then the 40-byte
/// zstd:chunked one.
pub fn parse_footer(tail: &[u8]) -> Result<TocLocation> {
    if tail.len() < ZSTD_FOOTER_SIZE as usize {
        return Err(EstargzError::BlobTooSmall {
            size: tail.len() as u64,
        });
    }
    let gzip = |footer_size: u64, legacy: bool, toc_offset: u64| TocLocation {
        toc_offset,
        footer_size,
        legacy,
        format: Format::Gzip,
        toc_size: None,
    };
    let estargz_err = match tail.len().checked_sub(FOOTER_SIZE as usize) {
        Some(start) => match parse_estargz(&tail[start..]) {
            Ok(toc_offset) => return Ok(gzip(FOOTER_SIZE, false, toc_offset)),
            Err(e) => e,
        },
        None => "shorter than 51 bytes".to_owned(),
    };
    let legacy_err = match tail.len().checked_sub(LEGACY_FOOTER_SIZE as usize) {
        Some(start) => match parse_legacy(&tail[start..]) {
            Ok(toc_offset) => return Ok(gzip(LEGACY_FOOTER_SIZE, true, toc_offset)),
            Err(e) => e,
        },
        None => "shorter than 47 bytes".to_owned(),
    };
    let start = tail.len() - ZSTD_FOOTER_SIZE as usize;
    parse_zstd_chunked(&tail[start..]).map_err(|zstd_err| {
        EstargzError::InvalidFooter(format!(
            "estargz: {estargz_err}; legacy: {legacy_err}; zstd:chunked: {zstd_err}"
        ))
    })
}

/// The zstd:chunked footer's magic (`GnUlInUx`).
const ZSTD_CHUNKED_MAGIC: &[u8; 8] = b"GnUlInUx";
/// The footer's manifest type for a TOC of eStargz's JSON model (containers/storage's
/// `ManifestTypeCRFS`), the only one there is.
const MANIFEST_TYPE_CRFS: u64 = 1;
/// A zstd skippable frame's header: magic and frame size, 4 bytes each.
pub const SKIPPABLE_HEADER_SIZE: u64 = 8;
/// The magic of the skippable frames that hold the TOC and the footer.
pub const SKIPPABLE_MAGIC: [u8; 4] = [0x50, 0x2a, 0x4d, 0x18];

fn parse_zstd_chunked(p: &[u8]) -> std::result::Result<TocLocation, String> {
    let field = |i: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&p[i * 8..i * 8 + 8]);
        u64::from_le_bytes(b)
    };
    if p.len() != ZSTD_FOOTER_SIZE as usize || &p[32..] != ZSTD_CHUNKED_MAGIC {
        return Err("GnUlInUx magic not found".into());
    }
    let (toc_offset, toc_size, manifest_type) = (field(0), field(1), field(3));
    if manifest_type != MANIFEST_TYPE_CRFS {
        return Err(format!(
            "manifest type {manifest_type}, want {MANIFEST_TYPE_CRFS}"
        ));
    }
    // The TOC sits in a skippable frame, behind its header; Go reads offsets as int64.
    if toc_offset < SKIPPABLE_HEADER_SIZE || toc_offset > i64::MAX as u64 {
        return Err(format!("TOC offset {toc_offset} out of range"));
    }
    Ok(TocLocation {
        toc_offset,
        footer_size: ZSTD_FOOTER_SIZE,
        legacy: false,
        format: Format::ZstdChunked,
        toc_size: Some(toc_size),
    })
}

/// The zstd:chunked trailer for a compressed TOC written at `toc_frame_offset`: the TOC's
/// skippable frame, then the footer's, as Go's `zstdchunked.Compressor` writes them. Returns
/// the bytes and the blob offset of the compressed TOC (the footer's first field).
pub fn zstd_chunked_trailer(
    toc_frame_offset: u64,
    compressed_toc: &[u8],
    json_len: u64,
) -> (Vec<u8>, u64) {
    let toc_offset = toc_frame_offset + SKIPPABLE_HEADER_SIZE;
    let mut out =
        Vec::with_capacity(compressed_toc.len() + 2 * SKIPPABLE_HEADER_SIZE as usize + 40);
    let mut frame = |body: &[u8]| {
        out.extend_from_slice(&SKIPPABLE_MAGIC);
        // A TOC is bounded by MAX_TOC_COMPRESSED_SIZE, far below 4 GiB.
        out.extend_from_slice(&u32::try_from(body.len()).unwrap_or(u32::MAX).to_le_bytes());
        out.extend_from_slice(body);
    };
    frame(compressed_toc);
    let mut footer = [0u8; ZSTD_FOOTER_SIZE as usize];
    for (i, v) in [
        toc_offset,
        compressed_toc.len() as u64,
        json_len,
        MANIFEST_TYPE_CRFS,
    ]
    .into_iter()
    .enumerate()
    {
        footer[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
    }
    footer[32..].copy_from_slice(ZSTD_CHUNKED_MAGIC);
    frame(&footer);
    (out, toc_offset)
}

/// Returns the FEXTRA bytes of the gzip header at the start of `p`, which must be `want_xlen`
/// long. Like Go's gzip header reader, later optional header fields are not needed here.
fn gzip_extra(p: &[u8], want_xlen: usize) -> std::result::Result<&[u8], String> {
    if p.len() < 12 || p[..3] != GZIP_ID {
        return Err("not a gzip member".into());
    }
    if p[3] & FEXTRA == 0 {
        return Err("gzip header has no FEXTRA".into());
    }
    let xlen = u16::from_le_bytes([p[10], p[11]]) as usize;
    if xlen != want_xlen {
        return Err(format!("extra field is {xlen} bytes, want {want_xlen}"));
    }
    p.get(12..12 + xlen)
        .ok_or_else(|| "extra field truncated".to_owned())
}

fn parse_estargz(p: &[u8]) -> std::result::Result<u64, String> {
    let extra = gzip_extra(p, 26)?;
    if extra[0] != b'S' || extra[1] != b'G' {
        return Err(format!(
            "subfield id {:?}, want \"SG\"",
            String::from_utf8_lossy(&extra[..2])
        ));
    }
    let slen = u16::from_le_bytes([extra[2], extra[3]]);
    if slen != 22 {
        return Err(format!("subfield length {slen}, want 22"));
    }
    parse_offset_magic(&extra[4..])
}

fn parse_legacy(p: &[u8]) -> std::result::Result<u64, String> {
    let extra = gzip_extra(p, 22)?;
    parse_offset_magic(extra)
}

/// `%016x` + `STARGZ` → offset. Only hex digits are accepted (no sign, no spaces).
fn parse_offset_magic(b: &[u8]) -> std::result::Result<u64, String> {
    if b.len() != 22 || &b[16..] != MAGIC {
        return Err("STARGZ magic not found".into());
    }
    let digits = &b[..16];
    if !digits.iter().all(u8::is_ascii_hexdigit) {
        return Err("TOC offset is not 16 hex digits".into());
    }
    let s = std::str::from_utf8(digits).map_err(|e| e.to_string())?;
    let off = u64::from_str_radix(s, 16).map_err(|e| e.to_string())?;
    // Go parses it as int64: offsets with the top bit set are invalid there, so here too.
    if off > i64::MAX as u64 {
        return Err(format!("TOC offset {off:#x} out of range"));
    }
    Ok(off)
}

#[cfg(test)]
mod tests {
    use std::io::Read as _;

    use super::*;

    /// The 47-byte legacy stargz footer, as old stargz tools wrote it.
    fn legacy_footer_bytes(toc_offset: u64) -> [u8; LEGACY_FOOTER_SIZE as usize] {
        let mut out = [0u8; LEGACY_FOOTER_SIZE as usize];
        out[..3].copy_from_slice(&GZIP_ID);
        out[3] = FEXTRA;
        out[9] = 0xff;
        out[10..12].copy_from_slice(&22u16.to_le_bytes());
        let hexoff = format!("{toc_offset:016x}");
        out[12..28].copy_from_slice(&hexoff.as_bytes()[..16]);
        out[28..34].copy_from_slice(MAGIC);
        out[34..].copy_from_slice(&EMPTY_BODY);
        out
    }

    #[test]
    fn estargz_footer_round_trips_and_is_an_empty_gzip_member() {
        for off in [0u64, 1, 0x1234_5678_9abc, i64::MAX as u64] {
            let f = footer_bytes(off);
            let loc = parse_footer(&f).expect("parse");
            assert_eq!(
                loc,
                TocLocation {
                    toc_offset: off,
                    footer_size: 51,
                    legacy: false,
                    format: Format::Gzip,
                    toc_size: None,
                }
            );
            let mut out = Vec::new();
            flate2::read::GzDecoder::new(&f[..])
                .read_to_end(&mut out)
                .expect("valid gzip");
            assert!(out.is_empty());
        }
    }

    #[test]
    fn footer_matches_go_layout() {
        let f = footer_bytes(0x10);
        let want_head = [
            0x1f, 0x8b, 0x08, 0x04, 0, 0, 0, 0, 0, 0xff, 26, 0, b'S', b'G', 22, 0,
        ];
        assert_eq!(&f[..16], &want_head);
        assert_eq!(&f[16..38], b"0000000000000010STARGZ");
    }

    #[test]
    fn legacy_footer_is_found_after_estargz_fails() {
        let mut blob = vec![7u8; 100];
        blob.extend_from_slice(&legacy_footer_bytes(42));
        let loc = parse_footer(&blob).expect("parse");
        assert_eq!(
            loc,
            TocLocation {
                toc_offset: 42,
                footer_size: 47,
                legacy: true,
                format: Format::Gzip,
                toc_size: None,
            }
        );
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&legacy_footer_bytes(42)[..])
            .read_to_end(&mut out)
            .expect("valid gzip");
        // A 47-byte tail alone also works.
        assert!(parse_footer(&legacy_footer_bytes(9)).is_ok());
    }

    #[test]
    fn toc_range_is_checked() {
        let loc = TocLocation {
            toc_offset: 100,
            footer_size: 51,
            legacy: false,
            format: Format::Gzip,
            toc_size: None,
        };
        assert_eq!(loc.toc_range(200).expect("in range"), 100..149);
        assert!(loc.toc_range(151).is_err());
        assert!(loc.toc_range(10).is_err());
        assert_eq!(loc.payload_end(), 100);
    }

    /// A zstd:chunked blob: chunks, the TOC's skippable frame, the footer's.
    fn zstd_blob(payload: &[u8], toc: &[u8]) -> Vec<u8> {
        let mut blob = payload.to_vec();
        let (trailer, _) = zstd_chunked_trailer(blob.len() as u64, toc, 1234);
        blob.extend_from_slice(&trailer);
        blob
    }

    #[test]
    fn zstd_chunked_footer_is_found_and_bounds_the_toc() {
        let blob = zstd_blob(b"chunks", b"compressed TOC");
        // Go's layout: the footer is the body of the last skippable frame.
        let footer_frame = &blob[blob.len() - 48..];
        assert_eq!(&footer_frame[..4], &SKIPPABLE_MAGIC);
        assert_eq!(&footer_frame[4..8], &40u32.to_le_bytes());
        let loc = parse_footer(&blob).expect("zstd:chunked footer");
        assert_eq!(
            loc,
            TocLocation {
                toc_offset: 6 + 8,
                footer_size: 40,
                legacy: false,
                format: Format::ZstdChunked,
                toc_size: Some(14),
            }
        );
        assert_eq!(loc.payload_end(), 6);
        let (r, asked) = read_member(&blob);
        let (_, member) = r.expect("located");
        assert_eq!(member, b"compressed TOC");
        assert_eq!(asked, [(blob.len() as u64 - 51, 51), (14, 14)]);
        // Only the 40-byte footer is needed.
        assert!(parse_footer(&blob[blob.len() - 40..]).is_ok());
    }

    #[test]
    fn zstd_chunked_footer_lies_are_refused() {
        let blob = zstd_blob(b"chunks", b"compressed TOC");
        let n = blob.len();
        let with = |i: usize, v: u64| {
            let mut b = blob.clone();
            b[n - 40 + i * 8..n - 40 + i * 8 + 8].copy_from_slice(&v.to_le_bytes());
            b
        };
        // A TOC that runs into the footer, or past the end of the blob.
        for lie in [with(1, 15), with(1, u64::MAX), with(0, u64::MAX - 3)] {
            match parse_footer(&lie) {
                Ok(loc) => assert!(loc.toc_range(n as u64).is_err(), "{loc:?}"),
                Err(e) => assert!(matches!(e, EstargzError::InvalidFooter(_))),
            }
        }
        // An offset inside the first skippable header, an unknown manifest type, a bad magic.
        assert!(parse_footer(&with(0, 7)).is_err());
        assert!(parse_footer(&with(3, 2)).is_err());
        let mut bad = blob.clone();
        bad[n - 1] = b'y';
        let e = parse_footer(&bad).expect_err("no magic");
        assert!(
            e.to_string()
                .contains("zstd:chunked: GnUlInUx magic not found"),
            "{e}"
        );
        // An empty TOC is no TOC.
        let empty = zstd_blob(b"chunks", b"");
        let loc = parse_footer(&empty).expect("parses");
        assert!(loc.toc_range(empty.len() as u64).is_err());
    }

    /// What [`read_toc_member`] returned for a blob, and the ranges it asked for.
    type Outcome = (Result<(TocLocation, Vec<u8>)>, Vec<(u64, u64)>);

    fn read_member(blob: &[u8]) -> Outcome {
        let mut asked = Vec::new();
        let r = read_toc_member(blob.len() as u64, |off, len| {
            asked.push((off, len));
            Ok(blob[off as usize..(off + len) as usize].to_vec())
        });
        (r, asked)
    }

    #[test]
    fn locator_reads_the_tail_then_exactly_the_member() {
        let mut blob = b"payload-".to_vec();
        let toc_offset = blob.len() as u64;
        blob.extend_from_slice(b"TOC MEMBER");
        blob.extend_from_slice(&footer_bytes(toc_offset));
        let (r, asked) = read_member(&blob);
        let (loc, member) = r.expect("located");
        assert_eq!(member, b"TOC MEMBER");
        assert!(!loc.legacy);
        let size = blob.len() as u64;
        assert_eq!(asked, [(size - 51, 51), (toc_offset, 10)]);

        let mut legacy = b"TOC".to_vec();
        legacy.extend_from_slice(&legacy_footer_bytes(0));
        let (r, asked) = read_member(&legacy);
        let (loc, member) = r.expect("legacy located");
        assert_eq!((loc.footer_size, member.as_slice()), (47, &b"TOC"[..]));
        assert_eq!(asked, [(0, 50), (0, 3)]);
    }

    #[test]
    fn locator_on_a_tiny_blob_reads_it_whole_and_fails() {
        assert_eq!(TocLocator::new(10).footer_range(), 0..10);
        assert_eq!(TocLocator::new(1000).footer_range(), 949..1000);
        let (r, asked) = read_member(&[0u8; 10]);
        assert!(matches!(r, Err(EstargzError::BlobTooSmall { size: 10 })));
        assert_eq!(asked, [(0, 10)]);
    }

    /// A footer that points far back names a member over the limit: refused before it is
    /// fetched, with the format's error.
    #[test]
    fn locator_refuses_a_huge_member_before_fetching_it() {
        let blob_size = MAX_TOC_COMPRESSED_SIZE + 1000;
        let mut calls = 0;
        let r = read_toc_member(blob_size, |_, len| {
            calls += 1;
            assert_eq!(len, MAX_FOOTER_SIZE);
            Ok::<_, EstargzError>(footer_bytes(0).to_vec())
        });
        assert!(matches!(
            r,
            Err(EstargzError::TocTooLarge { size, limit })
                if size == blob_size - FOOTER_SIZE && limit == MAX_TOC_COMPRESSED_SIZE
        ));
        assert_eq!(calls, 1);
        let exactly = MAX_TOC_COMPRESSED_SIZE + FOOTER_SIZE;
        let (_, range) = TocLocator::new(exactly)
            .locate(&footer_bytes(0))
            .expect("at the limit");
        assert_eq!(range, 0..MAX_TOC_COMPRESSED_SIZE);
    }

    #[test]
    fn locator_passes_read_errors_through() {
        #[derive(Debug)]
        enum Caller {
            Read,
            Format(EstargzError),
        }
        impl From<EstargzError> for Caller {
            fn from(e: EstargzError) -> Self {
                Caller::Format(e)
            }
        }
        let r = read_toc_member(100, |_, _| Err(Caller::Read));
        assert!(matches!(r, Err(Caller::Read)));
        let r = read_toc_member(100, |_, len| Ok(vec![0u8; len as usize]));
        assert!(matches!(
            r,
            Err(Caller::Format(EstargzError::InvalidFooter(_)))
        ));
        let r = read_toc_member(60, |off, _| {
            if off == 9 {
                Ok(footer_bytes(100).to_vec())
            } else {
                Err(Caller::Read)
            }
        });
        assert!(matches!(
            r,
            Err(Caller::Format(EstargzError::TocOutOfRange { .. }))
        ));
    }

    #[test]
    fn garbage_is_rejected() {
        assert!(parse_footer(&[0u8; 10]).is_err());
        assert!(parse_footer(&[0u8; 51]).is_err());
        let mut f = footer_bytes(5);
        f[20] = b'g';
        assert!(parse_footer(&f).is_err());
        let mut f = footer_bytes(5);
        f[16] = b'8'; // top bit set
        assert!(parse_footer(&f).is_err());
    }
}
