//! The apiserver as a [`ClusterSource`]: three kube-runtime watchers (Services,
//! discovery.k8s.io/v1 EndpointSlices, Nodes; all namespaces) merged into one stream of
//! [`ClusterEvent`]s.
//!
//! Nothing is published until every watcher has listed once (like kube-runtime's
//! `Store::wait_until_ready`, but across kinds); then the whole state, then `Synced`. After that
//! only real changes are published: relists after a desync and updates that do not change the
//! converted model (a Node's status heartbeat) publish nothing. See [`tracker`].

mod tracker;

use super::{PROXIED_SLICES_SELECTOR, endpoint_slice, node, service, service_key};
use crate::model::{ClusterEvent, EndpointSlice, Node, ServiceKey, Skips, SliceKey};
use crate::source::{ClusterSource, SourceError};
use futures::{StreamExt, stream::BoxStream};
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::discovery::v1 as discovery;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Resource};
use std::fmt::Debug;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use tokio::sync::mpsc;
use tracker::{Change, KindTracker};

/// Watches the apiserver behind `client`.
pub struct KubeSource {
    client: kube::Client,
    skips: Arc<Skips>,
    config: watcher::Config,
}

impl KubeSource {
    /// Default watcher settings: bookmarks on, lists paged by 500 (client-go's pager default),
    /// consistent ("most recent") lists so that a relist never goes back in time.
    pub fn new(client: kube::Client, skips: Arc<Skips>) -> Self {
        KubeSource { client, skips, config: watcher::Config::default() }
    }

    /// Objects per list page; smaller pages cost more round trips but less memory per response.
    pub fn with_page_size(mut self, page_size: u32) -> Self {
        self.config = self.config.page_size(page_size);
        self
    }
}

/// A client for `kubeconfig` when given, else inferred ($KUBECONFIG, ~/.kube/config, then the
/// in-cluster service account).
pub async fn client_from(kubeconfig: Option<PathBuf>) -> Result<kube::Client, SourceError> {
    let config = match kubeconfig {
        Some(path) => {
            let context = || format!("reading kubeconfig {}", path.display());
            let file = kube::config::Kubeconfig::read_from(&path).map_err(|e| kube_error(context(), e))?;
            kube::Config::from_custom_kubeconfig(file, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|e| kube_error(context(), e))?
        }
        None => kube::Config::infer().await.map_err(|e| kube_error("inferring the cluster config".into(), e))?,
    };
    kube::Client::try_from(config).map_err(|e| kube_error("building the client".into(), e))
}

fn kube_error(context: String, e: impl std::error::Error + Send + Sync + 'static) -> SourceError {
    SourceError::Kube { context, source: Box::new(e) }
}

impl ClusterSource for KubeSource {
    fn run(
        self: Box<Self>,
        events: mpsc::Sender<ClusterEvent>,
    ) -> Pin<Box<dyn Future<Output = Result<(), SourceError>> + Send>> {
        Box::pin(self.watch(events))
    }
}

/// One item from one of the three watchers (boxed: a Node is three times a Service).
type Item<K> = Box<Result<watcher::Event<K>, watcher::Error>>;

enum Update {
    Service(Item<core::Service>),
    Slice(Item<discovery::EndpointSlice>),
    Node(Item<core::Node>),
}

impl KubeSource {
    async fn watch(self, events: mpsc::Sender<ClusterEvent>) -> Result<(), SourceError> {
        let KubeSource { client, skips, config } = self;
        let streams: [BoxStream<'static, Update>; 3] = [
            kind_stream(Api::all(client.clone()), &config, Update::Service),
            // Like kube-proxy, slices of headless services and of another proxy's are not even
            // listed (the EndpointSlice controller labels them).
            kind_stream(Api::all(client.clone()), &config.clone().labels(PROXIED_SLICES_SELECTOR), Update::Slice),
            kind_stream(Api::all(client), &config, Update::Node),
        ];
        let mut updates = futures::stream::select_all(streams);
        let mut state = State::default();
        let mut out = Vec::new();
        // One update is handled (and its events sent) before the next is polled, so a
        // watcher's next request always sees the previous events published.
        loop {
            let update = tokio::select! {
                update = updates.next() => update,
                () = events.closed() => return Err(SourceError::Closed),
            };
            // The watchers retry forever; they end only if kube-runtime changes that.
            let Some(update) = update else { return Ok(()) };
            state.handle(update, &skips, &mut out);
            for event in out.drain(..) {
                events.send(event).await.map_err(|_| SourceError::Closed)?;
            }
        }
    }
}

/// A watcher with kube-runtime's default backoff (client-go's: 0.8 s doubling to 30 s,
/// jittered): errors are yielded once, then the next attempt waits.
fn kind_stream<K>(api: Api<K>, config: &watcher::Config, tag: fn(Item<K>) -> Update) -> BoxStream<'static, Update>
where
    K: Resource + Clone + serde::de::DeserializeOwned + Debug + Send + 'static,
{
    watcher(api, config.clone()).default_backoff().map(move |item| tag(Box::new(item))).boxed()
}

#[derive(Default)]
struct State {
    services: KindTracker<ServiceKey, SeenService>,
    slices: KindTracker<SliceKey, EndpointSlice>,
    nodes: KindTracker<String, Node>,
    synced: bool,
}

impl State {
    fn handle(&mut self, update: Update, skips: &Skips, out: &mut Vec<ClusterEvent>) {
        let changed = match update {
            Update::Service(event) => step(
                &mut self.services,
                *event,
                "Service",
                |o| service_key(&o.metadata),
                |o| Some(service(o, skips).map_or(SeenService::NotProxied, SeenService::Proxied)),
                SeenService::event,
            ),
            Update::Slice(event) => step(
                &mut self.slices,
                *event,
                "EndpointSlice",
                |o| service_key(&o.metadata),
                |o| endpoint_slice(o, skips),
                ClusterEvent::Slice,
            ),
            Update::Node(event) => step(
                &mut self.nodes,
                *event,
                "Node",
                |o| o.metadata.name.clone().unwrap_or_default(),
                |o| Some(node(o)),
                ClusterEvent::Node,
            ),
        };
        if self.synced {
            out.extend(changed);
        } else if self.services.listed() && self.slices.listed() && self.nodes.listed() {
            // The changes of the last list are part of the full state published here.
            self.synced = true;
            let nodes = self.nodes.current().map(|(k, m)| ClusterEvent::Node(k.clone(), Some(m.clone())));
            let services = self.services.current().map(|(k, m)| SeenService::event(k.clone(), Some(m.clone())));
            let slices = self.slices.current().map(|(k, m)| ClusterEvent::Slice(k.clone(), Some(m.clone())));
            out.extend(nodes.chain(services).chain(slices));
            out.push(ClusterEvent::Synced);
            tracing::info!(events = out.len() - 1, "initial lists complete");
        }
    }
}

/// Every Service is tracked, proxied or not: the cache must know that a headless Service exists
/// to ignore its EndpointSlices quietly.
#[derive(Debug, Clone, PartialEq)]
enum SeenService {
    Proxied(crate::model::Service),
    NotProxied,
}

impl SeenService {
    fn event(key: ServiceKey, seen: Option<SeenService>) -> ClusterEvent {
        match seen {
            Some(SeenService::Proxied(s)) => ClusterEvent::Service(key, Some(s)),
            Some(SeenService::NotProxied) => ClusterEvent::NotProxied(key),
            None => ClusterEvent::Service(key, None),
        }
    }
}

/// Feeds one watcher event to `tracker`; returns the events it implies.
fn step<O, K, M>(
    tracker: &mut KindTracker<K, M>,
    event: Result<watcher::Event<O>, watcher::Error>,
    kind: &'static str,
    key: impl Fn(&O) -> K,
    convert: impl Fn(&O) -> Option<M>,
    wrap: fn(K, Option<M>) -> ClusterEvent,
) -> Vec<ClusterEvent>
where
    O: Resource,
    K: Ord + Clone,
    M: Clone + PartialEq,
{
    let rv = |o: &O| o.meta().resource_version.clone().unwrap_or_default();
    let changes: Vec<Change<K, M>> = match event {
        Ok(watcher::Event::Init) => {
            tracing::debug!(kind, "listing");
            tracker.init();
            vec![]
        }
        Ok(watcher::Event::InitApply(o)) => {
            tracker.init_apply(key(&o), rv(&o), || convert(&o));
            vec![]
        }
        Ok(watcher::Event::InitDone) => {
            let changes = tracker.init_done();
            tracing::debug!(kind, changes = changes.len(), "listed");
            changes
        }
        Ok(watcher::Event::Apply(o)) => tracker.apply(key(&o), rv(&o), || convert(&o)).into_iter().collect(),
        Ok(watcher::Event::Delete(o)) => tracker.delete(&key(&o)).into_iter().collect(),
        Err(watcher::Error::WatchError(status)) if status.code == 410 => {
            tracing::info!(kind, "watch expired (410 Gone); relisting");
            vec![]
        }
        Err(error) => {
            tracing::warn!(kind, %error, "watch failed; retrying with backoff");
            vec![]
        }
    };
    changes.into_iter().map(|(k, m)| wrap(k, m)).collect()
}
