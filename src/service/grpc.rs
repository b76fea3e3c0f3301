//! The tonic adapter: implements containerd's `Snapshots` service on any [`Snapshotter`].
//! Domain calls block (disk, mounts), so each runs on a blocking thread.

use std::pin::Pin;
use std::sync::Arc;

use tonic::{Request, Response, Status};
use tracing::debug;

use super::convert::{info_in, info_out, labels_in, mounts_out, status};
use crate::proto::containerd::services::snapshots::v1 as pb;
use crate::proto::containerd::services::snapshots::v1::snapshots_server::Snapshots;
use crate::snapshot::{SnapshotError, Snapshotter};

/// Infos per List message, as containerd's own proxy service chunks them.
const LIST_CHUNK: usize = 100;

/// gRPC service wrapping a snapshotter.
pub struct SnapshotService<S: Snapshotter> {
    inner: Arc<S>,
}

impl<S: Snapshotter> SnapshotService<S> {
    pub fn new(inner: Arc<S>) -> Self {
        SnapshotService { inner }
    }

    async fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&S) -> Result<T, SnapshotError> + Send + 'static,
    ) -> Result<T, Status> {
        let sn = self.inner.clone();
        match tokio::task::spawn_blocking(move || f(&sn)).await {
            Ok(r) => r.map_err(status),
            Err(e) => Err(Status::internal(format!("snapshotter task failed: {e}"))),
        }
    }
}

type ListStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::ListSnapshotsResponse, Status>> + Send>>;

#[tonic::async_trait]
impl<S: Snapshotter> Snapshots for SnapshotService<S> {
    async fn prepare(
        &self,
        req: Request<pb::PrepareSnapshotRequest>,
    ) -> Result<Response<pb::PrepareSnapshotResponse>, Status> {
        let r = req.into_inner();
        debug!(key = %r.key, parent = %r.parent, "prepare");
        let mounts = self
            .call(move |s| s.prepare(&r.key, &r.parent, labels_in(r.labels)))
            .await?;
        Ok(Response::new(pb::PrepareSnapshotResponse {
            mounts: mounts_out(mounts),
        }))
    }

    async fn view(
        &self,
        req: Request<pb::ViewSnapshotRequest>,
    ) -> Result<Response<pb::ViewSnapshotResponse>, Status> {
        let r = req.into_inner();
        debug!(key = %r.key, parent = %r.parent, "view");
        let mounts = self
            .call(move |s| s.view(&r.key, &r.parent, labels_in(r.labels)))
            .await?;
        Ok(Response::new(pb::ViewSnapshotResponse {
            mounts: mounts_out(mounts),
        }))
    }

    async fn mounts(
        &self,
        req: Request<pb::MountsRequest>,
    ) -> Result<Response<pb::MountsResponse>, Status> {
        let r = req.into_inner();
        let mounts = self.call(move |s| s.mounts(&r.key)).await?;
        Ok(Response::new(pb::MountsResponse {
            mounts: mounts_out(mounts),
        }))
    }

    async fn commit(
        &self,
        req: Request<pb::CommitSnapshotRequest>,
    ) -> Result<Response<()>, Status> {
        let r = req.into_inner();
        debug!(key = %r.key, name = %r.name, "commit");
        self.call(move |s| s.commit(&r.name, &r.key, labels_in(r.labels)))
            .await?;
        Ok(Response::new(()))
    }

    async fn remove(
        &self,
        req: Request<pb::RemoveSnapshotRequest>,
    ) -> Result<Response<()>, Status> {
        let r = req.into_inner();
        debug!(key = %r.key, "remove");
        self.call(move |s| s.remove(&r.key)).await?;
        Ok(Response::new(()))
    }

    async fn stat(
        &self,
        req: Request<pb::StatSnapshotRequest>,
    ) -> Result<Response<pb::StatSnapshotResponse>, Status> {
        let r = req.into_inner();
        let info = self.call(move |s| s.stat(&r.key)).await?;
        Ok(Response::new(pb::StatSnapshotResponse {
            info: Some(info_out(info)),
        }))
    }

    async fn update(
        &self,
        req: Request<pb::UpdateSnapshotRequest>,
    ) -> Result<Response<pb::UpdateSnapshotResponse>, Status> {
        let r = req.into_inner();
        let info = r
            .info
            .ok_or_else(|| Status::invalid_argument("update request has no snapshot info"))?;
        let paths = r.update_mask.map(|m| m.paths).unwrap_or_default();
        let info = self.call(move |s| s.update(info_in(info), &paths)).await?;
        Ok(Response::new(pb::UpdateSnapshotResponse {
            info: Some(info_out(info)),
        }))
    }

    type ListStream = ListStream;

    async fn list(
        &self,
        req: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Response<Self::ListStream>, Status> {
        let r = req.into_inner();
        let infos = self.call(move |s| s.list(&r.filters)).await?;
        let mut chunks = Vec::new();
        let mut it = infos.into_iter().map(info_out).peekable();
        while it.peek().is_some() {
            chunks.push(Ok(pb::ListSnapshotsResponse {
                info: it.by_ref().take(LIST_CHUNK).collect(),
            }));
        }
        Ok(Response::new(Box::pin(tokio_stream::iter(chunks))))
    }

    async fn usage(
        &self,
        req: Request<pb::UsageRequest>,
    ) -> Result<Response<pb::UsageResponse>, Status> {
        let r = req.into_inner();
        let u = self.call(move |s| s.usage(&r.key)).await?;
        Ok(Response::new(pb::UsageResponse {
            size: u.size,
            inodes: u.inodes,
        }))
    }

    async fn cleanup(&self, _req: Request<pb::CleanupRequest>) -> Result<Response<()>, Status> {
        self.call(|s| s.cleanup()).await?;
        Ok(Response::new(()))
    }
}
