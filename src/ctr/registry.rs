//! Where `rpull` gets manifests and blobs from: the [`Fetcher`] seam and its implementation
//! over the crate's registry client ([`crate::remote`]), which brings docker-config
//! credentials, mirrors and retries.
//!
//! `rpull` only needs "resolve a reference" and "stream a whole blob", so it talks through
//! this trait and the unpacker's tests can run without a registry.

use std::future::Future;
use std::io::Write;
use std::pin::Pin;

use bytes::Bytes;
use futures_util::Stream;
use tokio::sync::mpsc;

use super::Error;
use crate::oci::{is_index_type, Descriptor, MEDIA_DOCKER_MANIFEST, MEDIA_OCI_MANIFEST};
use crate::remote::{Blob, ClientConfig, Credentials, Reference, RegistryClient, Secret};

pub type BlobStream = Pin<Box<dyn Stream<Item = Result<Bytes, Error>> + Send>>;

/// Read access to one image repository.
pub trait Fetcher: Send + Sync {
    /// Resolves the reference to its top descriptor (manifest or index) and its bytes.
    fn resolve(&self) -> impl Future<Output = Result<(Descriptor, Bytes), Error>> + Send;
    /// Fetches a small blob or manifest whole (digest-verified).
    fn fetch_small(&self, desc: &Descriptor) -> impl Future<Output = Result<Bytes, Error>> + Send;
    /// Streams a blob; the stream ends in an error if the bytes do not match the digest
    /// (the content store verifies again on commit).
    fn fetch_stream(
        &self,
        desc: &Descriptor,
    ) -> impl Future<Output = Result<BlobStream, Error>> + Send;
}

/// Options mirroring `ctr`'s registry flags.
#[derive(Debug, Clone, Default)]
pub struct RegistryOptions {
    pub plain_http: bool,
    pub skip_verify: bool,
    /// `user[:password]`; never logged.
    pub user: Option<String>,
}

impl RegistryOptions {
    /// The registry client settings for pulling `reference`: `--plain-http` makes its host
    /// insecure, `--skip-verify` turns TLS verification off (for all hosts, like Go's
    /// resolver), `--user` becomes that host's credentials ahead of the docker config.
    fn client_config(&self, reference: &Reference) -> ClientConfig {
        let mut config = ClientConfig {
            skip_tls_verify: self.skip_verify,
            ..Default::default()
        };
        if self.plain_http {
            config.insecure_hosts.push(reference.host.clone());
        }
        if let Some(user) = &self.user {
            let (username, secret) = user.split_once(':').unwrap_or((user.as_str(), ""));
            config.credentials.insert(
                reference.host.clone(),
                Credentials {
                    username: username.to_string(),
                    secret: Secret::new(secret),
                },
            );
        }
        config
    }
}

/// [`Fetcher`] over [`RegistryClient`] for one reference.
pub struct RemoteFetcher {
    client: RegistryClient,
    reference: Reference,
}

/// Bounded so a slow content store throttles the download instead of buffering it.
const STREAM_DEPTH: usize = 8;

impl RemoteFetcher {
    pub fn new(reference: Reference, opts: &RegistryOptions) -> Result<Self, Error> {
        let client = RegistryClient::new(opts.client_config(&reference))?;
        Ok(Self { client, reference })
    }
}

fn check_size(desc: &Descriptor, len: u64) -> Result<(), Error> {
    if len as i64 != desc.size {
        return Err(Error::Format(format!(
            "{} is {len} bytes, descriptor says {}",
            desc.digest, desc.size
        )));
    }
    Ok(())
}

fn is_manifest_type(mt: &str) -> bool {
    is_index_type(mt) || matches!(mt, MEDIA_OCI_MANIFEST | MEDIA_DOCKER_MANIFEST)
}

/// The `Write` end of a blob download: a bounded std channel, so a slow content store blocks
/// the download thread instead of letting bytes pile up. Fails once the reader is gone,
/// which stops the download. (Tokio's `blocking_send` cannot be used here: the download runs
/// inside `Handle::block_on`, which counts as async context.)
struct ChannelWriter(std::sync::mpsc::SyncSender<Result<Bytes, Error>>);

impl Write for ChannelWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.send(Ok(Bytes::copy_from_slice(buf))).map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::BrokenPipe, "blob stream dropped")
        })?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Fetcher for RemoteFetcher {
    async fn resolve(&self) -> Result<(Descriptor, Bytes), Error> {
        let m = self
            .client
            .fetch_manifest(&self.reference, self.reference.object())
            .await?;
        let desc = Descriptor {
            media_type: m.media_type,
            digest: m.digest,
            size: m.raw.len() as i64,
            urls: vec![],
            annotations: Default::default(),
            platform: None,
        };
        Ok((desc, Bytes::from(m.raw)))
    }

    async fn fetch_small(&self, desc: &Descriptor) -> Result<Bytes, Error> {
        let raw = if is_manifest_type(&desc.media_type) {
            self.client
                .fetch_manifest(&self.reference, &desc.digest)
                .await?
                .raw
        } else {
            self.client
                .fetch_blob_bytes(&self.reference, &desc.digest)
                .await?
        };
        check_size(desc, raw.len() as u64)?;
        Ok(Bytes::from(raw))
    }

    /// The download runs on a blocking thread ([`crate::remote::SyncBlob`]) writing into a
    /// bounded channel that a second blocking thread forwards to the stream. Dropping the
    /// stream stops both.
    async fn fetch_stream(&self, desc: &Descriptor) -> Result<BlobStream, Error> {
        let blob = Blob::open(&self.client, &self.reference, &desc.digest).await?;
        check_size(desc, blob.size())?;
        let sync = blob.sync(tokio::runtime::Handle::current());
        let (std_tx, std_rx) = std::sync::mpsc::sync_channel(STREAM_DEPTH);
        let (tx, rx) = mpsc::channel(STREAM_DEPTH);
        tokio::task::spawn_blocking(move || {
            let mut writer = ChannelWriter(std_tx.clone());
            if let Err(e) = sync.fetch_verified_into(&mut writer) {
                // Ends the stream in an error so the content writer never commits.
                let _ = std_tx.send(Err(e.into()));
            }
        });
        // Outside any runtime context, so it may block on the async channel.
        tokio::task::spawn_blocking(move || {
            while let Ok(item) = std_rx.recv() {
                if tx.blocking_send(item).is_err() {
                    break;
                }
            }
        });
        Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_ctr_flags_to_client_config() {
        let r: Reference = "reg.example:5000/a/b:1".parse().unwrap();
        let opts = RegistryOptions {
            plain_http: true,
            skip_verify: true,
            user: Some("me:pw:x".into()),
        };
        let c = opts.client_config(&r);
        assert_eq!(c.insecure_hosts, ["reg.example:5000"]);
        assert!(c.skip_tls_verify);
        let creds = &c.credentials["reg.example:5000"];
        assert_eq!(
            (creds.username.as_str(), creds.secret.expose()),
            ("me", "pw:x")
        );
        assert!(
            !format!("{c:?}").contains("pw:x"),
            "credentials must not be printable"
        );

        let c = RegistryOptions::default().client_config(&r);
        assert!(c.insecure_hosts.is_empty() && c.credentials.is_empty() && !c.skip_tls_verify);
    }
}
