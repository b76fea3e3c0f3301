//! The memory store (`filesystem_cache_type = "memory"`): each committed chunk is kept as one
//! buffer in memory. It has no backing files, so every read goes through the daemon, and
//! nothing survives a restart. Chosen explicitly by users who want no file data on disk.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::ops::Range;
use std::path::Path;
use std::sync::{Arc, Mutex};

use super::{ChunkKey, ChunkSink, Committed, LayerCache, Writer};

type Files = HashMap<u64, BTreeMap<u64, Arc<Vec<u8>>>>;

/// Committed chunks by file and start offset.
#[derive(Debug, Default)]
pub struct MemoryCache {
    files: Arc<Mutex<Files>>,
}

fn lock(files: &Mutex<Files>) -> std::sync::MutexGuard<'_, Files> {
    files.lock().unwrap_or_else(|e| e.into_inner())
}

struct MemorySink {
    files: Arc<Mutex<Files>>,
    ino: u64,
    start: u64,
    buf: Vec<u8>,
}

impl ChunkSink for MemorySink {
    fn write_at(&mut self, data: &[u8], _offset: u64) -> io::Result<()> {
        self.buf.extend_from_slice(data);
        Ok(())
    }

    fn commit(&mut self) -> io::Result<()> {
        let buf = Arc::new(std::mem::take(&mut self.buf));
        lock(&self.files)
            .entry(self.ino)
            .or_default()
            .insert(self.start, buf);
        Ok(())
    }

    fn abort(&mut self) {
        self.buf = Vec::new();
    }
}

impl LayerCache for MemoryCache {
    fn add(&self, key: &ChunkKey) -> io::Result<Writer> {
        let sink = MemorySink {
            files: self.files.clone(),
            ino: key.ino,
            start: key.range.start,
            buf: Vec::new(),
        };
        Ok(Writer::new(Box::new(sink), key.range.clone()))
    }

    fn read_at(&self, ino: u64, _size: u64, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let files = lock(&self.files);
        let chunks = files
            .get(&ino)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no cached data"))?;
        let mut pos = offset;
        let end = offset + buf.len() as u64;
        while pos < end {
            let (&start, data) = chunks
                .range(..=pos)
                .next_back()
                .filter(|(&s, d)| s + d.len() as u64 > pos)
                .ok_or_else(|| {
                    io::Error::new(io::ErrorKind::NotFound, format!("byte {pos} is not cached"))
                })?;
            let from = usize::try_from(pos - start).map_err(io::Error::other)?;
            let n = (data.len() - from).min(usize::try_from(end - pos).map_err(io::Error::other)?);
            let at = usize::try_from(pos - offset).map_err(io::Error::other)?;
            buf[at..at + n].copy_from_slice(&data[from..from + n]);
            pos += n as u64;
        }
        Ok(())
    }

    fn reuse(
        &self,
        _key: &ChunkKey,
        _verify: &mut dyn FnMut(&mut dyn io::Read) -> bool,
    ) -> Option<Committed> {
        None
    }

    fn backing_file(&self, _ino: u64) -> Option<std::fs::File> {
        None
    }

    fn discard(&self, ino: u64, range: Range<u64>) -> io::Result<()> {
        if let Some(chunks) = lock(&self.files).get_mut(&ino) {
            chunks.retain(|&s, d| s + d.len() as u64 <= range.start || s >= range.end);
        }
        Ok(())
    }

    fn dir(&self) -> Option<&Path> {
        None
    }

    fn file_path(&self, _ino: u64) -> Option<std::path::PathBuf> {
        None
    }

    fn unpack(&self) -> io::Result<usize> {
        Ok(0)
    }

    fn packed(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use super::*;

    fn key(ino: u64, range: Range<u64>) -> ChunkKey {
        ChunkKey {
            ino,
            size: 100,
            range,
        }
    }

    #[test]
    fn only_committed_chunks_are_readable_and_discard_drops_them() {
        let c = MemoryCache::default();
        let mut w = c.add(&key(1, 0..4)).expect("add");
        w.write_all(b"abcd").expect("write");
        let mut buf = [0u8; 4];
        assert!(
            c.read_at(1, 100, &mut buf, 0).is_err(),
            "nothing before commit"
        );
        w.commit().expect("commit");
        let mut w = c.add(&key(1, 4..8)).expect("add");
        w.write_all(b"ef").expect("write");
        assert!(w.commit().is_err(), "a short chunk does not commit");
        let mut w = c.add(&key(1, 4..8)).expect("add");
        w.write_all(b"efgh").expect("write");
        w.commit().expect("commit");
        let mut buf = [0u8; 6];
        c.read_at(1, 100, &mut buf, 1).expect("read across chunks");
        assert_eq!(&buf, b"bcdefg");
        let mut w = c.add(&key(2, 0..2)).expect("add");
        w.write_all(b"zz").expect("write");
        drop(w);
        assert!(
            c.read_at(2, 100, &mut [0u8; 2], 0).is_err(),
            "a dropped writer leaves nothing"
        );
        c.discard(1, 4..8).expect("discard");
        assert!(c.read_at(1, 100, &mut [0u8; 1], 5).is_err());
        c.read_at(1, 100, &mut [0u8; 4], 0)
            .expect("the other chunk stays");
    }
}
