//! Shared test plumbing: a controlplane on loopback fed from a channel, model builders, and
//! simulated nodes built on the real dataplane session code.
#![allow(dead_code)]

use kpx_controlplane::cache::CacheConfig;
use kpx_controlplane::model::*;
use kpx_controlplane::server::SyncConfig;
pub use kpx_controlplane::source::ChannelSource;
use kpx_dataplane::stream::{Apply, NodeIdentity, Session, SyncEvent};
use kpx_proto::v1 as pb;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

pub mod secure;

pub struct Controlplane {
    pub addr: SocketAddr,
    pub events: mpsc::UnboundedSender<ClusterEvent>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Controlplane {
    pub async fn start(sync: SyncConfig) -> Controlplane {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (events, rx) = mpsc::unbounded_channel();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let source = Box::new(ChannelSource(rx));
            kpx_controlplane::serve(
                listener,
                source,
                Arc::new(Skips::default()),
                CacheConfig::default(),
                sync,
                async {
                    let _ = stopped.await;
                },
            )
            .await
            .unwrap();
        });
        Controlplane { addr, events, stop: Some(stop), task }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn send(&self, e: ClusterEvent) {
        self.events.send(e).unwrap();
    }

    pub async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("controlplane shuts down promptly")
            .unwrap();
    }

    pub async fn inspect(&self) -> pb::inspect_client::InspectClient<tonic::transport::Channel> {
        pb::inspect_client::InspectClient::connect(self.url()).await.unwrap()
    }

    pub async fn nodes(&self) -> Vec<pb::NodeStatus> {
        self.inspect().await.list_nodes(pb::ListNodesRequest {}).await.unwrap().into_inner().nodes
    }

    /// Polls ListNodes until `pred` holds for the named node.
    pub async fn wait_node(&self, name: &str, what: &str, pred: impl Fn(&pb::NodeStatus) -> bool) -> pb::NodeStatus {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let nodes = self.nodes().await;
            if let Some(n) = nodes.iter().find(|n| n.name == name && pred(n)) {
                return n.clone();
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "node {name}: timed out waiting for {what}; nodes: {nodes:#?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

pub fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

pub fn cluster_ip_service(ns: &str, name: &str, cluster_ip: &str, port: u16) -> Service {
    Service {
        key: ServiceKey::new(ns, name),
        service_type: ServiceType::ClusterIp,
        cluster_ips: vec![ip(cluster_ip)],
        external_ips: vec![],
        load_balancer_ips: vec![],
        load_balancer_source_ranges: vec![],
        ports: vec![ServicePort { name: "http".into(), protocol: Protocol::Tcp, port, node_port: 0 }],
        session_affinity_timeout: None,
        external_policy_local: false,
        internal_policy_local: false,
        health_check_node_port: 0,
        topology_aware: false,
    }
}

pub fn endpoint(ip_: &str, node: &str) -> SliceEndpoint {
    SliceEndpoint {
        ip: ip(ip_),
        ready: true,
        serving: true,
        terminating: false,
        node_name: Some(node.into()),
        zone: None,
        zone_hints: None,
        node_hints: None,
    }
}

pub fn slice(ns: &str, service: &str, name: &str, target_port: u16, endpoints: Vec<SliceEndpoint>) -> EndpointSlice {
    EndpointSlice {
        key: ServiceKey::new(ns, name),
        service: ServiceKey::new(ns, service),
        family: IpFamily::V4,
        ports: vec![SlicePort { name: "http".into(), protocol: Protocol::Tcp, port: target_port }],
        endpoints,
        trigger_time: None,
    }
}

pub fn service_event(s: Service) -> ClusterEvent {
    ClusterEvent::Service(s.key.clone(), Some(s))
}

pub fn slice_event(s: EndpointSlice) -> ClusterEvent {
    ClusterEvent::Slice(s.key.clone(), Some(s))
}

pub fn node_event(name: &str, zone: Option<&str>) -> ClusterEvent {
    ClusterEvent::Node(name.into(), Some(Node { name: name.into(), zone: zone.map(String::from), addresses: vec![] }))
}

/// A session whose stream ended, and why.
type Ended = (Session<Box<dyn Apply>>, kpx_dataplane::stream::StreamError);

/// A simulated node: the real dataplane session with an in-memory backend, driven in a task.
pub struct SimNode {
    pub events: mpsc::UnboundedReceiver<SyncEvent>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Ended>>,
    pub session: Option<Session<Box<dyn Apply>>>,
}

impl SimNode {
    pub fn new(name: &str, backend: Box<dyn Apply>) -> SimNode {
        let identity = NodeIdentity {
            node_name: name.into(),
            backend: "sim".into(),
            ip_families: vec!["IPv4".into()],
            zone: String::new(),
        };
        SimNode {
            events: mpsc::unbounded_channel().1,
            stop: None,
            task: None,
            session: Some(Session::new(identity, backend)),
        }
    }

    /// Opens a Sync stream to `url` (keeping the applied state of earlier streams).
    pub async fn connect(&mut self, url: &str) {
        self.connect_with(url, &Default::default()).await
    }

    /// Opens a Sync stream with credentials.
    pub async fn connect_with(&mut self, url: &str, creds: &kpx_auth::client::ClientCredentials) {
        let mut session = self.session.take().expect("not connected");
        let (tx, rx) = mpsc::unbounded_channel();
        session.events = Some(tx);
        self.events = rx;
        let channel = kpx_dataplane::stream::connect_with(url, creds, Duration::from_secs(5)).await.unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        self.stop = Some(stop);
        self.task = Some(tokio::spawn(async move {
            let error = session
                .run_until(channel, async {
                    let _ = stopped.await;
                })
                .await;
            (session, error)
        }));
    }

    /// Hangs up, keeping the state.
    pub async fn disconnect(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            self.session = Some(task.await.unwrap().0);
        }
    }

    /// Waits for the stream to end by itself; returns why (the state is kept).
    pub async fn ended(&mut self, within: Duration) -> kpx_dataplane::stream::StreamError {
        let task = self.task.take().expect("connected");
        let (session, error) = tokio::time::timeout(within, task).await.expect("the stream ends in time").unwrap();
        self.session = Some(session);
        self.stop = None;
        error
    }

    /// The next event that is not Connected.
    pub async fn next(&mut self) -> SyncEvent {
        loop {
            match tokio::time::timeout(Duration::from_secs(10), self.events.recv())
                .await
                .expect("sync event within 10s")
                .expect("session alive")
            {
                SyncEvent::Connected => continue,
                e => return e,
            }
        }
    }

    /// Asserts nothing arrives for `d`.
    pub async fn expect_quiet(&mut self, d: Duration) {
        let deadline = tokio::time::Instant::now() + d;
        while let Ok(Some(e)) = tokio::time::timeout_at(deadline, self.events.recv()).await {
            assert!(matches!(e, SyncEvent::Connected), "expected no update, got {e:?}");
        }
    }
}

/// Accepts everything.
pub struct Accept;

impl Apply for Accept {
    fn apply(
        &mut self,
        _: &kpx_dataplane::state::AppliedState,
        _: &kpx_dataplane::state::ChangeSet,
    ) -> Result<(), String> {
        Ok(())
    }
}
