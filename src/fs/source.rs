//! Where a layer's compressed bytes come from: the seam between `fs` and `remote`.
//!
//! FUSE reads only ever ask for compressed ranges and stream them into a sink (the chunk
//! decoders), so no compressed copy is buffered or cached here; tests use a local file.

use std::io::{self, Write};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

/// A compressed layer blob, read by range. Implementations must be usable from many threads.
pub trait LayerSource: Send + Sync {
    /// Size of the whole blob in bytes.
    fn size(&self) -> u64;
    /// Streams the bytes `[offset, offset + len)` of the blob into `sink`, in order, as they
    /// arrive. An error may come after part of the range was written; the caller then
    /// discards what it got.
    fn fetch(&self, offset: u64, len: u64, sink: &mut (dyn Write + Send)) -> io::Result<()>;
    /// Streams the bytes of each of `ranges` (ascending, apart, not empty) into `sink`, one range
    /// after the other, like [`LayerSource::fetch`]. By default one fetch per range.
    fn fetch_ranges(&self, ranges: &[Range<u64>], sink: &mut (dyn Write + Send)) -> io::Result<()> {
        for r in ranges {
            self.fetch(r.start, r.end - r.start, sink)?;
        }
        Ok(())
    }
    /// Whether [`LayerSource::fetch_ranges`] costs about what one fetch of its bytes costs (one
    /// multi-range request, or a local file), so that a fetch may leave out what it will not
    /// need between what it does.
    fn multi_range(&self) -> bool {
        false
    }
    /// Checks that the blob is still reachable (the snapshotter's `check`).
    fn check(&self) -> io::Result<()> {
        Ok(())
    }
    /// The blob's last bytes if they came with locating it (offset, bytes); handed out once.
    fn take_tail(&self) -> Option<(u64, Vec<u8>)> {
        None
    }
}

impl<T: LayerSource + ?Sized> LayerSource for Arc<T> {
    fn size(&self) -> u64 {
        (**self).size()
    }
    fn fetch(&self, offset: u64, len: u64, sink: &mut (dyn Write + Send)) -> io::Result<()> {
        (**self).fetch(offset, len, sink)
    }
    fn fetch_ranges(&self, ranges: &[Range<u64>], sink: &mut (dyn Write + Send)) -> io::Result<()> {
        (**self).fetch_ranges(ranges, sink)
    }
    fn multi_range(&self) -> bool {
        (**self).multi_range()
    }
    fn check(&self) -> io::Result<()> {
        (**self).check()
    }
    fn take_tail(&self) -> Option<(u64, Vec<u8>)> {
        (**self).take_tail()
    }
}

/// Reads a whole (small) range into memory: the footer and the TOC.
pub fn fetch_vec(src: &dyn LayerSource, offset: u64, len: u64) -> io::Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(usize::try_from(len).unwrap_or(0).min(64 << 20));
    src.fetch(offset, len, &mut buf)?;
    if buf.len() as u64 != len {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("short range {offset}+{len}"),
        ));
    }
    Ok(buf)
}

/// A blob in a local file.
#[derive(Debug)]
pub struct FileSource {
    file: std::fs::File,
    size: u64,
}

impl FileSource {
    pub fn open(path: &Path) -> io::Result<Self> {
        let file = std::fs::File::open(path)?;
        let size = file.metadata()?.len();
        Ok(FileSource { file, size })
    }
}

impl LayerSource for FileSource {
    fn size(&self) -> u64 {
        self.size
    }

    fn multi_range(&self) -> bool {
        true
    }

    fn fetch(&self, offset: u64, len: u64, sink: &mut (dyn Write + Send)) -> io::Result<()> {
        let end = offset
            .checked_add(len)
            .filter(|&e| e <= self.size)
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("range {offset}+{len} past blob end {}", self.size),
                )
            })?;
        let mut buf = vec![0u8; 256 << 10];
        let mut pos = offset;
        while pos < end {
            let want = usize::try_from(end - pos)
                .unwrap_or(usize::MAX)
                .min(buf.len());
            let n = self.file.read_at(&mut buf[..want], pos)?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "blob file shrank",
                ));
            }
            sink.write_all(&buf[..n])?;
            pos += n as u64;
        }
        Ok(())
    }
}
