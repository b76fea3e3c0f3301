//! The memory store (`http_cache_type = "memory"`): committed entries are shared byte slices.
//! It has no budget; it lives as long as the layer that owns it.

use std::collections::HashMap;
use std::io::{self, Write};
use std::sync::{Arc, Mutex, MutexGuard};

use super::{validate_key, BlobCache, CacheError, CacheReader, CacheWriter};

/// A [`BlobCache`] held in memory.
#[derive(Clone, Default)]
pub struct MemoryCache {
    entries: Arc<Mutex<HashMap<String, Arc<[u8]>>>>,
}

impl MemoryCache {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Arc<[u8]>>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl BlobCache for MemoryCache {
    fn add(&self, key: &str) -> Result<Box<dyn CacheWriter>, CacheError> {
        validate_key(key)?;
        Ok(Box::new(MemWriter {
            cache: self.clone(),
            key: key.to_owned(),
            data: Vec::new(),
        }))
    }

    fn get(&self, key: &str) -> Result<Arc<dyn CacheReader>, CacheError> {
        let data = self
            .lock()
            .get(key)
            .cloned()
            .ok_or_else(|| CacheError::NotFound(key.to_owned()))?;
        Ok(Arc::new(MemReader(data)))
    }

    fn contains(&self, key: &str) -> bool {
        self.lock().contains_key(key)
    }

    fn remove(&self, key: &str) -> Result<(), CacheError> {
        self.lock().remove(key);
        Ok(())
    }

    fn remove_prefix(&self, prefix: &str) -> Result<u64, CacheError> {
        let mut map = self.lock();
        let mut freed = 0;
        map.retain(|k, v| {
            let hit = k.starts_with(prefix);
            if hit {
                freed += v.len() as u64;
            }
            !hit
        });
        Ok(freed)
    }

    fn usage(&self) -> u64 {
        self.lock().values().map(|v| v.len() as u64).sum()
    }
}

struct MemWriter {
    cache: MemoryCache,
    key: String,
    data: Vec<u8>,
}

impl Write for MemWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.data.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl CacheWriter for MemWriter {
    fn commit(self: Box<Self>) -> Result<(), CacheError> {
        let MemWriter { cache, key, data } = *self;
        cache.lock().insert(key, data.into());
        Ok(())
    }

    fn abort(self: Box<Self>) {}
}

struct MemReader(Arc<[u8]>);

impl CacheReader for MemReader {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let start = usize::try_from(offset)
            .unwrap_or(usize::MAX)
            .min(self.0.len());
        let n = buf.len().min(self.0.len() - start);
        buf[..n].copy_from_slice(&self.0[start..start + n]);
        Ok(n)
    }

    fn size(&self) -> u64 {
        self.0.len() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_abort_remove() {
        let c = MemoryCache::new();
        let mut w = c.add("k1-a").unwrap();
        w.write_all(b"abc").unwrap();
        assert!(!c.contains("k1-a"));
        w.commit().unwrap();
        let mut w = c.add("k1-b").unwrap();
        w.write_all(b"zz").unwrap();
        drop(w);
        assert!(!c.contains("k1-b"));
        let r = c.get("k1-a").unwrap();
        let mut buf = [0; 8];
        assert_eq!(r.read_at(&mut buf, 1).unwrap(), 2);
        assert_eq!(&buf[..2], b"bc");
        assert_eq!(c.usage(), 3);
        assert_eq!(c.remove_prefix("k1-").unwrap(), 3);
        assert_eq!(c.usage(), 0);
    }
}
