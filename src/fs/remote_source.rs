//! The real [`LayerSource`]: a registry blob through `remote`, for the daemon.
//!
//! Ranges are streamed with `fetch_range_into` (nothing is cached in `remote`): the
//! decompressed bytes land in `fscache`, so no second, compressed copy of the same data is kept.

use std::io::{self, Write};
use std::sync::{Arc, Mutex};

use crate::estargz::MAX_FOOTER_SIZE;
use crate::remote::{Blob, Reference, RegistryClient, SyncBlob};

use super::ahead::{Ahead, DEFAULT_TTL};
use super::link::LinkEstimate;
use super::manager::BlobResolver;
use super::source::LayerSource;
use super::FsError;

/// Resolves blobs through the daemon's registry client. Calls block on `handle`, so they must
/// run on blocking threads (the snapshotter's calls already do).
pub struct RegistryResolver {
    client: RegistryClient,
    handle: tokio::runtime::Handle,
    link: Option<Arc<LinkEstimate>>,
    ahead: Arc<Ahead>,
}

impl RegistryResolver {
    pub fn new(client: RegistryClient, handle: tokio::runtime::Handle) -> Self {
        RegistryResolver {
            client,
            handle,
            link: None,
            ahead: Ahead::new(DEFAULT_TTL),
        }
    }

    /// How long a blob resolved ahead waits for its mount (`resolve_result_entry_ttl_sec`).
    pub fn with_ahead_ttl(mut self, ttl: std::time::Duration) -> Self {
        self.ahead = Ahead::new(ttl);
        self
    }

    /// How much of a blob's end to ask for when locating it: one round trip's worth of the
    /// link as measured so far, and at least the footer, which costs nothing extra and saves
    /// a request before the link is known (or where it is thin).
    fn tail_len(&self) -> u64 {
        self.link
            .as_ref()
            .map_or(0, |l| l.get().readahead(1))
            .max(MAX_FOOTER_SIZE)
    }

    /// Locating a blob also brings its last round trip's worth of bytes, as `link` measures
    /// it (footer and TOC, most of the time): see [`LayerSource::take_tail`].
    pub fn with_link(mut self, link: Arc<LinkEstimate>) -> Self {
        self.link = Some(link);
        self
    }
}

impl BlobResolver for RegistryResolver {
    fn resolve(&self, reference: &str, digest: &str) -> Result<Arc<dyn LayerSource>, FsError> {
        let r: Reference = reference
            .parse()
            .map_err(|e| FsError::Labels(format!("image reference {reference:?}: {e}")))?;
        // A resolution ahead that failed or timed out (logged there) is asked again here, and
        // this attempt's error is the one reported.
        let ahead = self
            .ahead
            .take(&r, digest)
            .and_then(|rx| self.handle.block_on(rx).ok())
            .map(|resolved| (resolved.blob, resolved.tail));
        let (blob, tail) = match ahead {
            Some(found) => found,
            None => self
                .handle
                .block_on(Blob::open_with_tail(
                    &self.client,
                    &r,
                    digest,
                    self.tail_len(),
                ))
                .map_err(|e| FsError::Source(e.into()))?,
        };
        Ok(Arc::new(RemoteSource {
            blob: blob.sync(self.handle.clone()),
            tail: Mutex::new(tail.map(|t| (t.offset, t.bytes))),
        }))
    }

    /// Invalid references and digests are skipped: this only saves time, and the mounts of
    /// those layers report what is wrong with their own labels.
    fn resolve_ahead(&self, reference: &str, digests: &[&str]) {
        let Ok(r) = reference.parse::<Reference>() else {
            return;
        };
        let valid: Vec<&str> = digests
            .iter()
            .copied()
            .filter(|d| crate::remote::valid_digest(d))
            .collect();
        self.ahead
            .start(&self.handle, &self.client, &r, &valid, self.tail_len());
    }
}

/// A registry blob as a [`LayerSource`].
pub struct RemoteSource {
    blob: SyncBlob,
    /// The blob's last bytes, brought by the probe that located it, until the TOC is read.
    tail: Mutex<Option<(u64, Vec<u8>)>>,
}

impl LayerSource for RemoteSource {
    fn size(&self) -> u64 {
        self.blob.size()
    }

    fn fetch(&self, offset: u64, len: u64, sink: &mut (dyn Write + Send)) -> io::Result<()> {
        self.blob
            .fetch_range_into(offset..offset + len, sink)
            .map(|_| ())
            .map_err(io::Error::from)
    }

    fn fetch_ranges(
        &self,
        ranges: &[std::ops::Range<u64>],
        sink: &mut (dyn Write + Send),
    ) -> io::Result<()> {
        self.blob
            .fetch_ranges_into(ranges, sink)
            .map(|_| ())
            .map_err(io::Error::from)
    }

    fn multi_range(&self) -> bool {
        self.blob.multi_range()
    }

    fn check(&self) -> io::Result<()> {
        self.blob.check().map_err(io::Error::from)
    }

    fn take_tail(&self) -> Option<(u64, Vec<u8>)> {
        self.tail.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}
