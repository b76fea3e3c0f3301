//! The real [`LayerSource`]: a registry blob through `remote`, for the daemon.
//!
//! Ranges are streamed with `fetch_range_into` (nothing is cached in `remote`): the
//! decompressed bytes land in `fscache`, so no second, compressed copy of the same data is kept.

use std::io::{self, Write};
use std::sync::Arc;

use crate::remote::{Blob, Reference, RegistryClient, SyncBlob};

use super::manager::BlobResolver;
use super::source::LayerSource;
use super::FsError;

/// Resolves blobs through the daemon's registry client. Calls block on `handle`, so they must
/// run on blocking threads (the snapshotter's calls already do).
pub struct RegistryResolver {
    client: RegistryClient,
    handle: tokio::runtime::Handle,
}

impl RegistryResolver {
    pub fn new(client: RegistryClient, handle: tokio::runtime::Handle) -> Self {
        RegistryResolver { client, handle }
    }
}

impl BlobResolver for RegistryResolver {
    fn resolve(&self, reference: &str, digest: &str) -> Result<Arc<dyn LayerSource>, FsError> {
        let r: Reference = reference
            .parse()
            .map_err(|e| FsError::Labels(format!("image reference {reference:?}: {e}")))?;
        let blob = self
            .handle
            .block_on(Blob::open(&self.client, &r, digest))
            .map_err(|e| FsError::Source(e.into()))?;
        Ok(Arc::new(RemoteSource(blob.sync(self.handle.clone()))))
    }
}

/// A registry blob as a [`LayerSource`].
pub struct RemoteSource(pub SyncBlob);

impl LayerSource for RemoteSource {
    fn size(&self) -> u64 {
        self.0.size()
    }

    fn fetch(&self, offset: u64, len: u64, sink: &mut (dyn Write + Send)) -> io::Result<()> {
        self.0
            .fetch_range_into(offset..offset + len, sink)
            .map(|_| ())
            .map_err(io::Error::from)
    }

    fn check(&self) -> io::Result<()> {
        self.0.check().map_err(io::Error::from)
    }
}
