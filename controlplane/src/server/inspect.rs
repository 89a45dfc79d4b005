//! `kpx.v1.Inspect`: read-only state for kpxctl and grpcurl.

use super::chunk::chunk_update;
use crate::cache::{Cache, InspectError};
use crate::model::ServiceKey;
use futures::Stream;
use kpx_proto::v1 as pb;
use kpx_proto::version::ContentHash;
use std::pin::Pin;
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

pub struct InspectService {
    cache: Arc<Cache>,
    max_chunk_bytes: usize,
}

impl InspectService {
    pub fn new(cache: Arc<Cache>) -> Self {
        InspectService { cache, max_chunk_bytes: kpx_proto::MAX_CHUNK_BYTES }
    }
}

fn status(e: InspectError) -> Status {
    match e {
        InspectError::UnknownNode(_) | InspectError::UnknownService(_) => Status::not_found(e.to_string()),
        InspectError::NotSynced => Status::unavailable(e.to_string()),
    }
}

type UpdateStream = Pin<Box<dyn Stream<Item = Result<pb::Update, Status>> + Send>>;

#[tonic::async_trait]
impl pb::inspect_server::Inspect for InspectService {
    async fn list_nodes(&self, _: Request<pb::ListNodesRequest>) -> Result<Response<pb::ListNodesResponse>, Status> {
        Ok(Response::new(pb::ListNodesResponse { nodes: self.cache.list_nodes() }))
    }

    async fn get_node_state(
        &self,
        request: Request<pb::GetNodeStateRequest>,
    ) -> Result<Response<pb::NodeState>, Status> {
        let name = request.into_inner().node_name;
        self.cache.node_state(&name).map(Response::new).map_err(status)
    }

    type WatchNodeStateStream = UpdateStream;

    async fn watch_node_state(
        &self,
        request: Request<pb::GetNodeStateRequest>,
    ) -> Result<Response<UpdateStream>, Status> {
        let name = request.into_inner().node_name;
        let (mut plan, mut seq, info) = self.cache.watch_snapshot(&name).map_err(status)?;
        let (tx, rx) = mpsc::channel(4);
        let cache = self.cache.clone();
        let max = self.max_chunk_bytes;
        let mut changes = cache.change_signal();
        tokio::spawn(async move {
            loop {
                changes.borrow_and_update();
                let version: ContentHash = plan.version;
                for chunk in chunk_update(plan, max) {
                    if tx.send(Ok(chunk)).await.is_err() {
                        return;
                    }
                }
                // Wait for a change that alters this node's state.
                let next = loop {
                    tokio::select! {
                        changed = changes.changed() => if changed.is_err() { return },
                        _ = tx.closed() => return,
                    }
                    match cache.watch_delta(&info, seq, version) {
                        Some((p, head)) if p.version != version => break Some((p, head)),
                        Some((_, head)) => seq = head,
                        None => break None,
                    }
                };
                match next {
                    Some((p, head)) => (plan, seq) = (p, head),
                    None => match cache.watch_snapshot(&info.name) {
                        Ok((p, head, _)) => (plan, seq) = (p, head),
                        Err(e) => {
                            let _ = tx.send(Err(status(e))).await;
                            return;
                        }
                    },
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn get_service(
        &self,
        request: Request<pb::GetServiceRequest>,
    ) -> Result<Response<pb::ServiceAcrossNodes>, Status> {
        let r = request.into_inner();
        if r.namespace.is_empty() || r.name.is_empty() {
            return Err(Status::invalid_argument("namespace and name are required"));
        }
        self.cache.service_across_nodes(&ServiceKey::new(r.namespace, r.name)).map(Response::new).map_err(status)
    }
}
