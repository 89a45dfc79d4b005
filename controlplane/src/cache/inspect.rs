//! Read-only views of the cache for the Inspect service: node status, a node's desired state
//! computed on demand, and one service as every node sees it.

use super::track::snapshot_content;
use super::{Cache, PlannedUpdate};
use crate::model::ServiceKey;
use crate::node_view::{NodeInfo, ViewClass};
use kpx_proto::v1 as pb;
use std::collections::BTreeMap;

#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error("node {0:?} is unknown: no Node object and no agent connected under that name")]
    UnknownNode(String),
    #[error("service {0} is not proxied (it does not exist, is headless or ExternalName, or another proxy handles it)")]
    UnknownService(String),
    #[error("the controlplane has not listed the cluster yet")]
    NotSynced,
}

impl Cache {
    pub fn list_nodes(&self) -> Vec<pb::NodeStatus> {
        let st = self.lock();
        st.nodes
            .values()
            .map(|t| pb::NodeStatus {
                name: t.info.name.clone(),
                connected: t.conn.is_some(),
                connected_since_unix_ms: t.conn.as_ref().map(|c| c.since_ms).unwrap_or(0),
                backend: t.conn.as_ref().map(|c| c.backend.clone()).unwrap_or_default(),
                ip_families: t.conn.as_ref().map(|c| c.ip_families.clone()).unwrap_or_default(),
                zone: t.info.zone.clone().unwrap_or_default(),
                desired_version: if st.synced { t.version.to_version() } else { String::new() },
                acked_version: t.acked.map(|a| a.version.to_version()).unwrap_or_default(),
                versions_behind: if st.synced { t.versions_behind() } else { 0 },
                last_nack_error: t.last_nack.clone(),
                last_apply_micros: t.last_apply_micros,
                last_ack_unix_ms: t.last_ack_ms,
                known_node: t.known_node,
                agent_version: t.conn.as_ref().map(|c| c.agent_version.clone()).unwrap_or_default(),
            })
            .collect()
    }

    fn node_info(&self, name: &str) -> Result<NodeInfo, InspectError> {
        let st = self.lock();
        if let Some(t) = st.nodes.get(name) {
            return Ok(t.info.clone());
        }
        match st.k8s_nodes.get(name) {
            Some(n) => Ok(NodeInfo { name: name.to_string(), zone: n.zone.clone() }),
            None => Err(InspectError::UnknownNode(name.to_string())),
        }
    }

    /// A node's whole desired state, whether or not it has connected.
    pub fn node_state(&self, name: &str) -> Result<pb::NodeState, InspectError> {
        let info = self.node_info(name)?;
        let st = self.lock();
        if !st.synced {
            return Err(InspectError::NotSynced);
        }
        let version = st.full_version(&info);
        let content = snapshot_content(&st, &info);
        drop(st);
        let mut by_service: BTreeMap<String, pb::ServiceState> = BTreeMap::new();
        for s in &content.services_upserted {
            let key = format!("{}/{}", s.namespace, s.name);
            by_service.insert(key, pb::ServiceState { service: Some((**s).clone()), endpoints: Vec::new() });
        }
        for e in content.upserted_endpoints() {
            if let Some(s) = by_service.get_mut(&e.service) {
                s.endpoints.push(e.clone());
            }
        }
        Ok(pb::NodeState {
            node_name: name.to_string(),
            version: version.to_version(),
            services: by_service.into_values().collect(),
        })
    }

    /// A snapshot for a read-only watcher of a node's state (WatchNodeState), and the change
    /// sequence number it corresponds to.
    pub fn watch_snapshot(&self, name: &str) -> Result<(PlannedUpdate, u64, NodeInfo), InspectError> {
        let info = self.node_info(name)?;
        let st = self.lock();
        if !st.synced {
            return Err(InspectError::NotSynced);
        }
        let planned = PlannedUpdate {
            nonce: self.next_nonce(),
            version: st.full_version(&info),
            base_version: None,
            full: true,
            content: snapshot_content(&st, &info),
            send_digest: false,
        };
        Ok((planned, st.head, info))
    }

    /// Changes after `since` for a read-only watcher; None when it fell too far behind (it
    /// then gets a new snapshot).
    pub fn watch_delta(
        &self,
        info: &NodeInfo,
        since: u64,
        base: kpx_proto::version::ContentHash,
    ) -> Option<(PlannedUpdate, u64)> {
        let st = self.lock();
        let merged = st.log.as_ref().expect("log").delta_since(since, info)?;
        let version = st.full_version(info);
        Some((
            PlannedUpdate {
                nonce: self.next_nonce(),
                version,
                base_version: Some(base),
                full: false,
                content: merged.into_content(),
                send_digest: false,
            },
            st.head,
        ))
    }

    /// Wakes whenever the cache publishes a change (for read-only watchers).
    pub fn change_signal(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// One service as every node sees it: nodes with the same view are grouped. Nodes that see
    /// the view shared by every ordinary node are listed as "*".
    pub fn service_across_nodes(&self, key: &ServiceKey) -> Result<pb::ServiceAcrossNodes, InspectError> {
        let st = self.lock();
        if !st.synced {
            return Err(InspectError::NotSynced);
        }
        let entry = st.entries.get(key).ok_or_else(|| InspectError::UnknownService(key.to_string()))?;
        let mut groups: BTreeMap<ViewClass, Vec<String>> = BTreeMap::new();
        for t in st.nodes.values() {
            groups.entry(entry.prepared.class_of(&t.info)).or_default().push(t.info.name.clone());
        }
        groups.entry(ViewClass::All).or_default();
        if entry.prepared.zone_dependent {
            groups.remove(&ViewClass::All);
        }
        let views = groups
            .into_iter()
            .map(|(class, nodes)| {
                let nodes = if class == ViewClass::All { vec!["*".to_string()] } else { nodes };
                pb::NodeGroupView { nodes, endpoints: entry.view(&class).endpoints.clone() }
            })
            .collect();
        Ok(pb::ServiceAcrossNodes { service: Some(entry.prepared.wire.message().clone()), views })
    }
}
