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

/// A source fed by hand through a channel: for embedding the controlplane in a program that
/// computes the cluster itself (the benchmarks' synthetic clusters) and for tests. It never
/// ends on its own; [`ClusterEvent::Synced`] is whatever the sender says.
pub struct ChannelSource(pub mpsc::UnboundedReceiver<ClusterEvent>);

impl ClusterSource for ChannelSource {
    fn run(
        self: Box<Self>,
        events: mpsc::Sender<ClusterEvent>,
    ) -> Pin<Box<dyn Future<Output = Result<(), SourceError>> + Send>> {
        let mut rx = self.0;
        Box::pin(async move {
            while let Some(e) = rx.recv().await {
                events.send(e).await.map_err(|_| SourceError::Closed)?;
            }
            std::future::pending().await
        })
    }
}
