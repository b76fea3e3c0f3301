//! A thin, namespaced connection to containerd's services (content, images, snapshots,
//! diff, leases) with the streaming content helpers `rpull` and `convert` need.

use std::collections::HashMap;
use std::path::Path;

use bytes::{Bytes, BytesMut};
use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use containerd_client::services::v1::{
    content_client::ContentClient, diff_client::DiffClient, images_client::ImagesClient,
    leases_client::LeasesClient, AbortRequest, CreateImageRequest, CreateRequest, DeleteRequest,
    GetImageRequest, Image, Info, InfoRequest, ReadContentRequest, UpdateImageRequest,
    UpdateRequest, WriteAction, WriteContentRequest,
};
use containerd_client::types::Descriptor as PbDescriptor;
use futures_util::{Stream, StreamExt};
use tokio::io::AsyncWriteExt;
use tonic::metadata::AsciiMetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

use super::Error;
use crate::oci::Descriptor;

/// gRPC metadata keys containerd reads (`namespaces.GRPCHeader`, `leases.GRPCHeader`).
const NAMESPACE_HEADER: &str = "containerd-namespace";
const LEASE_HEADER: &str = "containerd-lease";
/// Bytes per content Write message: well under gRPC's 4 MiB default message limit.
const WRITE_CHUNK: usize = 1 << 20;

/// Adds the namespace (and lease, if any) to every request.
#[derive(Clone)]
pub struct Headers {
    namespace: AsciiMetadataValue,
    lease: Option<AsciiMetadataValue>,
}

impl Interceptor for Headers {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        let md = req.metadata_mut();
        md.insert(NAMESPACE_HEADER, self.namespace.clone());
        if let Some(lease) = &self.lease {
            md.insert(LEASE_HEADER, lease.clone());
        }
        Ok(req)
    }
}

type Svc = InterceptedService<Channel, Headers>;

/// A connection to containerd in one namespace, optionally inside a lease.
#[derive(Clone)]
pub struct Containerd {
    channel: Channel,
    headers: Headers,
}

fn header_value(v: &str) -> Result<AsciiMetadataValue, Error> {
    v.parse()
        .map_err(|_| Error::InvalidArgument(format!("not a valid header value: {v:?}")))
}

fn grpc(op: &'static str) -> impl FnOnce(Status) -> Error {
    move |status| Error::Grpc { op, status }
}

impl Containerd {
    pub async fn connect(address: &Path, namespace: &str) -> Result<Self, Error> {
        let channel = containerd_client::connect(address)
            .await
            .map_err(|source| Error::Connect {
                address: address.display().to_string(),
                source,
            })?;
        Ok(Self {
            channel,
            headers: Headers {
                namespace: header_value(namespace)?,
                lease: None,
            },
        })
    }

    pub fn content(&self) -> ContentClient<Svc> {
        ContentClient::with_interceptor(self.channel.clone(), self.headers.clone())
    }
    pub fn images(&self) -> ImagesClient<Svc> {
        ImagesClient::with_interceptor(self.channel.clone(), self.headers.clone())
    }
    pub fn snapshots(&self) -> SnapshotsClient<Svc> {
        SnapshotsClient::with_interceptor(self.channel.clone(), self.headers.clone())
    }
    pub fn diff(&self) -> DiffClient<Svc> {
        DiffClient::with_interceptor(self.channel.clone(), self.headers.clone())
    }
    fn leases(&self) -> LeasesClient<Svc> {
        LeasesClient::with_interceptor(self.channel.clone(), self.headers.clone())
    }

    /// Creates a lease that expires in 24 h (as Go's `client.WithLease`) and returns a
    /// connection whose requests all carry it, so GC keeps what we write mid-pull.
    pub async fn with_new_lease(&self) -> Result<(Self, String), Error> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let id = format!("ctr-remote-{}-{}", now.as_nanos(), std::process::id());
        let expire = prost_types::Timestamp {
            seconds: now.as_secs() as i64 + 24 * 3600,
            nanos: 0,
        };
        let labels = HashMap::from([("containerd.io/gc.expire".to_string(), expire.to_string())]);
        self.leases()
            .create(CreateRequest {
                id: id.clone(),
                labels,
            })
            .await
            .map_err(grpc("leases.create"))?;
        let mut leased = self.clone();
        leased.headers.lease = Some(header_value(&id)?);
        Ok((leased, id))
    }

    pub async fn delete_lease(&self, id: &str) -> Result<(), Error> {
        self.leases()
            .delete(DeleteRequest {
                id: id.to_string(),
                sync: false,
            })
            .await
            .map_err(grpc("leases.delete"))?;
        Ok(())
    }

    /// Content info, or `None` when the blob is not in the store.
    pub async fn content_info(&self, digest: &str) -> Result<Option<Info>, Error> {
        match self
            .content()
            .info(InfoRequest {
                digest: digest.to_string(),
            })
            .await
        {
            Ok(r) => Ok(r.into_inner().info),
            Err(s) if s.code() == Code::NotFound => Ok(None),
            Err(s) => Err(grpc("content.info")(s)),
        }
    }

    /// Sets (merges) labels on an existing blob.
    pub async fn update_content_labels(
        &self,
        digest: &str,
        labels: &HashMap<String, String>,
    ) -> Result<(), Error> {
        if labels.is_empty() {
            return Ok(());
        }
        let paths = labels.keys().map(|k| format!("labels.{k}")).collect();
        let info = Info {
            digest: digest.to_string(),
            labels: labels.clone(),
            ..Default::default()
        };
        self.content()
            .update(UpdateRequest {
                info: Some(info),
                update_mask: Some(prost_types::FieldMask { paths }),
            })
            .await
            .map_err(grpc("content.update"))?;
        Ok(())
    }

    /// Writes a small blob held in memory.
    pub async fn write_bytes(
        &self,
        desc: &Descriptor,
        data: Bytes,
        labels: &HashMap<String, String>,
    ) -> Result<bool, Error> {
        self.write_stream(desc, futures_util::stream::once(async { Ok(data) }), labels)
            .await
    }

    /// Streams a blob into the content store, committing it under `desc.digest` (containerd
    /// verifies digest and size). Returns `false` when the blob was already there (its labels
    /// are then merged in). The writer's ref is aborted first so a stale half-written
    /// ingest from an interrupted run never makes us append at the wrong offset.
    pub async fn write_stream<S>(
        &self,
        desc: &Descriptor,
        data: S,
        labels: &HashMap<String, String>,
    ) -> Result<bool, Error>
    where
        S: Stream<Item = Result<Bytes, Error>> + Send + 'static,
    {
        if self.content_info(&desc.digest).await?.is_some() {
            self.update_content_labels(&desc.digest, labels).await?;
            return Ok(false);
        }
        let ref_ = format!("ctr-remote-{}", desc.digest);
        let _ = self
            .content()
            .abort(AbortRequest {
                r#ref: ref_.clone(),
            })
            .await;

        let (tx, rx) = tokio::sync::mpsc::channel::<WriteContentRequest>(4);
        let producer = tokio::spawn(produce_writes(ref_, desc.clone(), labels.clone(), data, tx));
        let result = self
            .content()
            .write(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await;
        let outcome = match result {
            Ok(resp) => {
                let mut responses = resp.into_inner();
                let mut committed = false;
                loop {
                    match responses.message().await {
                        Ok(Some(r)) if r.action == WriteAction::Commit as i32 => committed = true,
                        Ok(Some(_)) => {}
                        Ok(None) => break Ok(committed),
                        Err(s) => break Err(s),
                    }
                }
            }
            Err(s) => Err(s),
        };
        producer.abort();
        let produced = producer.await;
        match outcome {
            Ok(true) => Ok(true),
            Err(s) if s.code() == Code::AlreadyExists => {
                self.update_content_labels(&desc.digest, labels).await?;
                Ok(false)
            }
            Err(s) => Err(grpc("content.write")(s)),
            Ok(false) => match produced {
                Ok(Err(e)) => Err(e),
                _ => Err(Error::Incomplete(desc.digest.clone())),
            },
        }
    }

    /// Streams `size` bytes of a blob from `offset`.
    pub async fn read_stream(
        &self,
        digest: &str,
        offset: i64,
        size: i64,
    ) -> Result<impl Stream<Item = Result<Bytes, Error>>, Error> {
        let resp = self
            .content()
            .read(ReadContentRequest {
                digest: digest.to_string(),
                offset,
                size,
            })
            .await
            .map_err(grpc("content.read"))?;
        Ok(resp
            .into_inner()
            .map(|r| r.map(|m| Bytes::from(m.data)).map_err(grpc("content.read"))))
    }

    /// Reads a whole (small) blob into memory.
    pub async fn read_all(&self, digest: &str) -> Result<Vec<u8>, Error> {
        let mut out = Vec::new();
        let mut s = std::pin::pin!(self.read_stream(digest, 0, 0).await?);
        while let Some(chunk) = s.next().await {
            out.extend_from_slice(&chunk?);
        }
        Ok(out)
    }

    /// Spools a blob to a file, never holding it in memory.
    pub async fn read_to_file(
        &self,
        digest: &str,
        file: &mut tokio::fs::File,
    ) -> Result<u64, Error> {
        let mut n = 0u64;
        let mut s = std::pin::pin!(self.read_stream(digest, 0, 0).await?);
        while let Some(chunk) = s.next().await {
            let chunk = chunk?;
            file.write_all(&chunk).await?;
            n += chunk.len() as u64;
        }
        file.flush().await?;
        Ok(n)
    }

    pub async fn get_image(&self, name: &str) -> Result<Image, Error> {
        self.images()
            .get(GetImageRequest {
                name: name.to_string(),
            })
            .await
            .map_err(grpc("images.get"))?
            .into_inner()
            .image
            .ok_or_else(|| Error::NotFound(format!("image {name}")))
    }

    /// Creates the image record, or replaces its target if it exists (Go's `createNewImage`).
    pub async fn put_image(
        &self,
        name: &str,
        target: &Descriptor,
        labels: &HashMap<String, String>,
    ) -> Result<(), Error> {
        let image = Image {
            name: name.to_string(),
            target: Some(to_pb(target)),
            labels: labels.clone(),
            ..Default::default()
        };
        match self
            .images()
            .create(CreateImageRequest {
                image: Some(image.clone()),
                source_date_epoch: None,
            })
            .await
        {
            Ok(_) => Ok(()),
            Err(s) if s.code() == Code::AlreadyExists => {
                self.images()
                    .update(UpdateImageRequest {
                        image: Some(image),
                        update_mask: Some(prost_types::FieldMask {
                            paths: vec!["target".into(), "labels".into()],
                        }),
                        source_date_epoch: None,
                    })
                    .await
                    .map_err(grpc("images.update"))?;
                Ok(())
            }
            Err(s) => Err(grpc("images.create")(s)),
        }
    }
}

/// Feeds the Write stream: STAT (opens the writer with expected digest/size), WRITE chunks
/// re-buffered to [`WRITE_CHUNK`], then COMMIT with the labels. Dropping `tx` ends the stream.
async fn produce_writes<S>(
    ref_: String,
    desc: Descriptor,
    labels: HashMap<String, String>,
    data: S,
    tx: tokio::sync::mpsc::Sender<WriteContentRequest>,
) -> Result<(), Error>
where
    S: Stream<Item = Result<Bytes, Error>> + Send + 'static,
{
    let closed = || Error::Incomplete(desc.digest.clone());
    let base = WriteContentRequest {
        r#ref: ref_,
        total: desc.size,
        expected: desc.digest.clone(),
        ..Default::default()
    };
    tx.send(WriteContentRequest {
        action: WriteAction::Stat as i32,
        ..base.clone()
    })
    .await
    .map_err(|_| closed())?;
    let mut offset = 0i64;
    let mut buf = BytesMut::with_capacity(WRITE_CHUNK);
    let mut data = std::pin::pin!(data);
    loop {
        let next = data.next().await.transpose()?;
        let done = next.is_none();
        if let Some(chunk) = next {
            buf.extend_from_slice(&chunk);
        }
        if buf.len() >= WRITE_CHUNK || (done && !buf.is_empty()) {
            let chunk = buf.split().freeze();
            let len = chunk.len() as i64;
            tx.send(WriteContentRequest {
                action: WriteAction::Write as i32,
                offset,
                data: chunk.to_vec(),
                ..base.clone()
            })
            .await
            .map_err(|_| closed())?;
            offset += len;
        }
        if done {
            break;
        }
    }
    tx.send(WriteContentRequest {
        action: WriteAction::Commit as i32,
        offset,
        labels,
        ..base
    })
    .await
    .map_err(|_| closed())?;
    Ok(())
}

pub fn to_pb(d: &Descriptor) -> PbDescriptor {
    PbDescriptor {
        media_type: d.media_type.clone(),
        digest: d.digest.clone(),
        size: d.size,
        annotations: d
            .annotations
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    }
}

pub fn from_pb(d: &PbDescriptor) -> Descriptor {
    Descriptor {
        media_type: d.media_type.clone(),
        digest: d.digest.clone(),
        size: d.size,
        urls: vec![],
        annotations: d
            .annotations
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        platform: None,
    }
}
