//! Sources of cluster state. Each one converts what it reads into [`ClusterEvent`]s; the
//! controlplane does not care whether they come from the apiserver or from files.

pub mod files;

use crate::model::ClusterEvent;
use std::future::Future;
use std::pin::Pin;
use tokio::sync::mpsc;

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("reading manifests from {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("apiserver client: {context}: {source}")]
    Kube {
        context: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("the controlplane stopped listening to the source")]
    Closed,
}

/// A source of cluster state. `run` emits the initial state, then [`ClusterEvent::Synced`] once
/// every kind has been listed, then changes, until the receiver is dropped.
pub trait ClusterSource: Send + 'static {
    fn run(
        self: Box<Self>,
        events: mpsc::Sender<ClusterEvent>,
    ) -> Pin<Box<dyn Future<Output = Result<(), SourceError>> + Send>>;
}
