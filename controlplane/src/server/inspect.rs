//! `kpx.v1.Inspect`: read-only state for kpxctl and grpcurl. Every call is authorized for its
//! caller (kpx_auth::authz): a node reads only itself, admins everything, other users what
//! RBAC grants on `nodestates.kpx.io`.

use super::chunk::chunk_update;
use crate::cache::{Cache, InspectError};
use crate::model::ServiceKey;
use futures::Stream;
use kpx_auth::{Access, Caller, Identity, Verb};
use kpx_proto::v1 as pb;
use kpx_proto::version::ContentHash;
use prost::Message;
use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

/// WatchNodeState streams one caller may have open at once (a node has one Sync stream; this
/// bounds what a stolen or buggy credential can hold open).
pub const MAX_WATCHES_PER_CALLER: usize = 8;

pub struct InspectService {
    cache: Arc<Cache>,
    max_chunk_bytes: usize,
    /// Open watches per caller (by identity).
    watches: Arc<Mutex<HashMap<String, usize>>>,
}

impl InspectService {
    pub fn new(cache: Arc<Cache>) -> Self {
        InspectService { cache, max_chunk_bytes: kpx_proto::MAX_CHUNK_BYTES, watches: Arc::default() }
    }

    /// Takes one of the caller's watch slots, freed when the guard drops (the watch ended).
    fn watch_slot(&self, caller: &Caller) -> Result<Option<WatchSlot>, Status> {
        if caller.identity == Identity::Open {
            return Ok(None);
        }
        let key = caller.identity.describe();
        let mut watches = self.watches.lock().unwrap_or_else(|e| e.into_inner());
        let open = watches.entry(key.clone()).or_default();
        if *open >= MAX_WATCHES_PER_CALLER {
            return Err(Status::resource_exhausted(format!(
                "{key} already has {MAX_WATCHES_PER_CALLER} WatchNodeState streams open"
            )));
        }
        *open += 1;
        Ok(Some(WatchSlot { key, watches: self.watches.clone() }))
    }
}

struct WatchSlot {
    key: String,
    watches: Arc<Mutex<HashMap<String, usize>>>,
}

impl Drop for WatchSlot {
    fn drop(&mut self) {
        let mut watches = self.watches.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = watches.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                watches.remove(&self.key);
            }
        }
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
    async fn list_nodes(
        &self,
        request: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        let caller = Caller::of(&request);
        caller.authorize(Access::ListNodes).await?;
        let mut nodes = self.cache.list_nodes();
        if let Some(me) = caller.node() {
            nodes.retain(|n| n.name == me);
        }
        Ok(Response::new(pb::ListNodesResponse { nodes }))
    }

    async fn get_node_state(
        &self,
        request: Request<pb::GetNodeStateRequest>,
    ) -> Result<Response<pb::NodeState>, Status> {
        let caller = Caller::of(&request);
        let name = request.into_inner().node_name;
        caller.authorize(Access::NodeState { node: &name, verb: Verb::Get }).await?;
        self.cache.node_state(&name).map(Response::new).map_err(status)
    }

    type WatchNodeStateStream = UpdateStream;

    async fn watch_node_state(
        &self,
        request: Request<pb::GetNodeStateRequest>,
    ) -> Result<Response<UpdateStream>, Status> {
        let caller = Caller::of(&request);
        let name = request.into_inner().node_name;
        caller.authorize(Access::NodeState { node: &name, verb: Verb::Watch }).await?;
        let slot = self.watch_slot(&caller)?;
        let (mut plan, mut seq, info) = self.cache.watch_snapshot(&name).map_err(status)?;
        let (tx, rx) = mpsc::channel(4);
        let cache = self.cache.clone();
        let max = self.max_chunk_bytes;
        let mut changes = cache.change_signal();
        tokio::spawn(async move {
            let _slot = slot;
            loop {
                changes.borrow_and_update();
                let version: ContentHash = plan.version;
                for chunk in chunk_update(plan, max) {
                    // (A person's watch: decoding the bytes again costs nothing that matters.)
                    let chunk = pb::Update::decode(chunk.to_vec().as_slice())
                        .map_err(|e| Status::internal(format!("re-decoding an update: {e}")));
                    if tx.send(chunk).await.is_err() {
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
        Caller::of(&request).authorize(Access::AllNodes).await?;
        let r = request.into_inner();
        if r.namespace.is_empty() || r.name.is_empty() {
            return Err(Status::invalid_argument("namespace and name are required"));
        }
        self.cache.service_across_nodes(&ServiceKey::new(r.namespace, r.name)).map(Response::new).map_err(status)
    }
}
