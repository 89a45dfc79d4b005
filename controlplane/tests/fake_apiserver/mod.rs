//! A fake kube-apiserver on 127.0.0.1 that speaks the real list/watch HTTP protocol for
//! Services, EndpointSlices and Nodes (all namespaces), in the spirit of kube-rs's
//! ApiServerVerifier (kube/src/mock_tests.rs), but as a real server so that kube-runtime's
//! watcher runs unmodified.
//!
//! - One resourceVersion counter for all kinds, like etcd's revision.
//! - Lists: `{kind}List` with metadata.resourceVersion; `limit`/`continue` paging; items without
//!   kind/apiVersion, as the apiserver returns them.
//! - Watches: `?watch=true&resourceVersion=N` replays the kind's history after N, then streams
//!   ADDED/MODIFIED/DELETED/BOOKMARK lines (chunked). A resourceVersion older than the kind's
//!   compaction point is answered with an ERROR event carrying a 410 Gone Status, as the
//!   apiserver does; kube-runtime then relists.
//! - Test controls: hold a kind's lists, change objects without telling watchers (events a
//!   client missed), expire watches, send bookmarks, and count requests.

#![allow(dead_code)] // each test binary uses a different part

pub mod auth;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    Service,
    EndpointSlice,
    Node,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::Service, Kind::EndpointSlice, Kind::Node];

    fn path(self) -> &'static str {
        match self {
            Kind::Service => "/api/v1/services",
            Kind::EndpointSlice => "/apis/discovery.k8s.io/v1/endpointslices",
            Kind::Node => "/api/v1/nodes",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Node => "Node",
        }
    }

    fn api_version(self) -> &'static str {
        match self {
            Kind::EndpointSlice => "discovery.k8s.io/v1",
            Kind::Service | Kind::Node => "v1",
        }
    }

    fn from_path(path: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.path() == path)
    }
}

type Body = BoxBody<Bytes, Infallible>;

#[derive(Default)]
struct KindData {
    /// By (namespace, name); stored with kind and apiVersion.
    objects: BTreeMap<(String, String), Value>,
    /// Watch events after the compaction point: (resourceVersion, JSON line).
    history: Vec<(u64, Bytes)>,
    /// Watches from a resourceVersion older than this get 410 Gone.
    compacted: u64,
    /// Open watch streams.
    watchers: Vec<mpsc::UnboundedSender<Bytes>>,
    list_starts: usize,
    list_pages: usize,
    watches_accepted: usize,
    watches_expired: usize,
    requests: Vec<String>,
}

#[derive(Default)]
struct State {
    resource_version: u64,
    kinds: HashMap<Kind, KindData>,
}

struct Shared {
    state: Mutex<State>,
    auth: Mutex<auth::AuthState>,
    /// Per kind: `true` while list responses are held back.
    held: HashMap<Kind, watch::Sender<bool>>,
}

pub struct FakeApiServer {
    url: String,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeApiServer {
    pub async fn start() -> FakeApiServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind fake apiserver");
        let url = format!("http://{}", listener.local_addr().unwrap());
        let held = Kind::ALL.into_iter().map(|k| (k, watch::channel(false).0)).collect();
        let shared = Arc::new(Shared { state: Mutex::new(State::default()), auth: Mutex::default(), held });
        let server = shared.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { return };
                let shared = server.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| {
                        let shared = shared.clone();
                        async move { Ok::<_, Infallible>(handle(&shared, req).await) }
                    });
                    // Connections end when a test drops its client; errors do not matter.
                    let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
                });
            }
        });
        FakeApiServer { url, shared, task }
    }

    /// A client for this server: plain HTTP, no auth.
    pub fn client(&self) -> kube::Client {
        let config = kube::Config::new(self.url.parse().unwrap());
        kube::Client::try_from(config).expect("client for the fake apiserver")
    }

    /// The authentication side: tokens, RBAC answers, pods, and the review requests received.
    pub fn auth<R>(&self, f: impl FnOnce(&mut auth::AuthState) -> R) -> R {
        f(&mut self.shared.auth.lock().unwrap())
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    fn with<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        f(&mut self.shared.state.lock().unwrap())
    }

    /// Creates or updates an object and tells the watchers (ADDED or MODIFIED).
    pub fn apply(&self, kind: Kind, object: Value) {
        self.with(|s| {
            let (rv, object, existed) = s.store(kind, object);
            let kind_data = s.kinds.entry(kind).or_default();
            kind_data.publish(rv, if existed { "MODIFIED" } else { "ADDED" }, object);
        });
    }

    /// Deletes an object and tells the watchers (DELETED, with the deletion's resourceVersion).
    pub fn delete(&self, kind: Kind, namespace: &str, name: &str) {
        self.with(|s| {
            if let Some((rv, object)) = s.remove(kind, namespace, name) {
                s.kinds.entry(kind).or_default().publish(rv, "DELETED", object);
            }
        });
    }

    /// Creates or updates an object without telling anyone: an event the watchers missed.
    pub fn apply_unseen(&self, kind: Kind, object: Value) {
        self.with(|s| s.store(kind, object));
    }

    /// Deletes an object without telling anyone.
    pub fn delete_unseen(&self, kind: Kind, namespace: &str, name: &str) {
        self.with(|s| s.remove(kind, namespace, name));
    }

    /// Ends every open watch of `kind` and compacts its history: watches resumed from any
    /// resourceVersion seen so far get 410 Gone, so clients must relist.
    pub fn expire_watches(&self, kind: Kind) {
        self.with(|s| {
            s.resource_version += 1;
            let rv = s.resource_version;
            let k = s.kinds.entry(kind).or_default();
            k.compacted = rv;
            k.history.clear();
            k.watchers.clear();
        });
    }

    /// Sends a BOOKMARK with the current resourceVersion to the open watches of `kind`.
    pub fn bookmark(&self, kind: Kind) {
        self.with(|s| {
            s.resource_version += 1;
            let rv = s.resource_version;
            let line = event_line(
                "BOOKMARK",
                &json!({"kind": kind.name(), "apiVersion": kind.api_version(),
                        "metadata": {"resourceVersion": rv.to_string()}}),
            );
            // Not history: bookmarks are not replayed.
            s.kinds.entry(kind).or_default().watchers.retain(|w| w.send(line.clone()).is_ok());
        });
    }

    /// List responses for `kind` wait until [`release_lists`](Self::release_lists).
    pub fn hold_lists(&self, kind: Kind) {
        self.shared.held[&kind].send_replace(true);
    }

    pub fn release_lists(&self, kind: Kind) {
        self.shared.held[&kind].send_replace(false);
    }

    /// Lists started (first pages), counted when the request arrives.
    pub fn list_starts(&self, kind: Kind) -> usize {
        self.with(|s| s.kinds.get(&kind).map_or(0, |k| k.list_starts))
    }

    /// List pages requested, including continuations.
    pub fn list_pages(&self, kind: Kind) -> usize {
        self.with(|s| s.kinds.get(&kind).map_or(0, |k| k.list_pages))
    }

    /// Watches that were accepted and are (or were) streaming.
    pub fn watches_accepted(&self, kind: Kind) -> usize {
        self.with(|s| s.kinds.get(&kind).map_or(0, |k| k.watches_accepted))
    }

    /// Watches answered with 410 Gone.
    pub fn watches_expired(&self, kind: Kind) -> usize {
        self.with(|s| s.kinds.get(&kind).map_or(0, |k| k.watches_expired))
    }

    /// Path and query of every request for `kind`, in order.
    pub fn requests(&self, kind: Kind) -> Vec<String> {
        self.with(|s| s.kinds.get(&kind).map(|k| k.requests.clone()).unwrap_or_default())
    }
}

/// Polls `condition` every 10 ms until it holds; panics after `timeout`.
pub async fn wait_until(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + timeout;
    while !condition() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

impl State {
    /// Stores an object with a new resourceVersion. Returns (rv, object, whether it existed).
    fn store(&mut self, kind: Kind, mut object: Value) -> (u64, Value, bool) {
        self.resource_version += 1;
        let rv = self.resource_version;
        object["kind"] = json!(kind.name());
        object["apiVersion"] = json!(kind.api_version());
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        let key = object_key(&object);
        let existed = self.kinds.entry(kind).or_default().objects.insert(key, object.clone()).is_some();
        (rv, object, existed)
    }

    fn remove(&mut self, kind: Kind, namespace: &str, name: &str) -> Option<(u64, Value)> {
        let mut object = self.kinds.entry(kind).or_default().objects.remove(&(namespace.into(), name.into()))?;
        self.resource_version += 1;
        let rv = self.resource_version;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        Some((rv, object))
    }
}

impl KindData {
    fn publish(&mut self, rv: u64, event_type: &str, object: Value) {
        let line = event_line(event_type, &object);
        self.history.push((rv, line.clone()));
        self.watchers.retain(|w| w.send(line.clone()).is_ok());
    }
}

fn object_key(object: &Value) -> (String, String) {
    let field = |f: &str| object["metadata"][f].as_str().unwrap_or_default().to_owned();
    (field("namespace"), field("name"))
}

fn event_line(event_type: &str, object: &Value) -> Bytes {
    let mut line = serde_json::to_vec(&json!({"type": event_type, "object": object})).unwrap();
    line.push(b'\n');
    Bytes::from(line)
}

async fn handle(shared: &Shared, req: Request<Incoming>) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    if let Some(answer) = auth::handle(&mut shared.auth.lock().unwrap(), &parts.method, parts.uri.path(), &body) {
        return answer;
    }
    let req = Request::from_parts(parts, ());
    let path_and_query = req.uri().path_and_query().map(|p| p.to_string()).unwrap_or_default();
    let Some(kind) = Kind::from_path(req.uri().path()) else {
        return status(StatusCode::NOT_FOUND, "NotFound", &format!("the server could not find {path_and_query}"));
    };
    let query: HashMap<String, String> = req
        .uri()
        .query()
        .unwrap_or_default()
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    shared.state.lock().unwrap().kinds.entry(kind).or_default().requests.push(path_and_query);
    if query.get("watch").is_some_and(|w| w == "true" || w == "1") {
        watch_response(shared, kind, &query)
    } else {
        list_response(shared, kind, &query).await
    }
}

async fn list_response(shared: &Shared, kind: Kind, query: &HashMap<String, String>) -> Response<Body> {
    let offset: usize = query.get("continue").and_then(|c| c.parse().ok()).unwrap_or(0);
    {
        let mut state = shared.state.lock().unwrap();
        let k = state.kinds.entry(kind).or_default();
        k.list_pages += 1;
        if offset == 0 {
            k.list_starts += 1;
        }
    }
    let mut held = shared.held[&kind].subscribe();
    let _ = held.wait_for(|held| !held).await;

    let state = shared.state.lock().unwrap();
    let objects: Vec<&Value> = state.kinds.get(&kind).map(|k| k.objects.values().collect()).unwrap_or_default();
    let limit = query.get("limit").and_then(|l| l.parse().ok()).unwrap_or(usize::MAX);
    let page: Vec<Value> = objects
        .iter()
        .skip(offset)
        .take(limit)
        .map(|o| {
            let mut item = (*o).clone();
            let map = item.as_object_mut().unwrap();
            map.remove("kind");
            map.remove("apiVersion");
            item
        })
        .collect();
    let mut metadata = json!({"resourceVersion": state.resource_version.to_string()});
    let next = offset + page.len();
    if next < objects.len() {
        metadata["continue"] = json!(next.to_string());
        metadata["remainingItemCount"] = json!(objects.len() - next);
    }
    let body = json!({
        "kind": format!("{}List", kind.name()),
        "apiVersion": kind.api_version(),
        "metadata": metadata,
        "items": page,
    });
    json_response(StatusCode::OK, &body)
}

fn watch_response(shared: &Shared, kind: Kind, query: &HashMap<String, String>) -> Response<Body> {
    let from: Option<u64> = query.get("resourceVersion").and_then(|rv| rv.parse().ok());
    let mut state = shared.state.lock().unwrap();
    let current = state.resource_version;
    let k = state.kinds.entry(kind).or_default();
    let (tx, rx) = mpsc::unbounded_channel();
    match from {
        Some(from) if from >= k.compacted => {
            k.watches_accepted += 1;
            for (_, line) in k.history.iter().filter(|(rv, _)| *rv > from) {
                let _ = tx.send(line.clone());
            }
            k.watchers.push(tx);
        }
        _ => {
            // What the apiserver sends for a resourceVersion etcd has compacted away: HTTP 200
            // and one ERROR event, then the end of the stream.
            k.watches_expired += 1;
            let message = format!("too old resource version: {} ({current})", from.unwrap_or(0));
            let gone = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                              "message": message, "reason": "Expired", "code": 410});
            let _ = tx.send(event_line("ERROR", &gone));
        }
    }
    let frames = futures::stream::unfold(rx, |mut rx| async move {
        let line = rx.recv().await?;
        Some((Ok::<_, Infallible>(Frame::data(line)), rx))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(StreamBody::new(frames).boxed())
        .unwrap()
}

fn json_response(code: StatusCode, body: &Value) -> Response<Body> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(serde_json::to_vec(body).unwrap())).boxed())
        .unwrap()
}

fn status(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    let body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                      "message": message, "reason": reason, "code": code.as_u16()});
    json_response(code, &body)
}

/// Real object shapes, as `kubectl get -o json` shows them.
pub mod objects {
    use serde_json::{Value, json};

    pub fn service(namespace: &str, name: &str, cluster_ip: &str) -> Value {
        json!({
            "metadata": {
                "name": name, "namespace": namespace,
                "uid": format!("uid-svc-{namespace}-{name}"),
                "creationTimestamp": "2026-11-01T10:00:00Z",
                "labels": {"app": name}
            },
            "spec": {
                "type": "ClusterIP",
                "clusterIP": cluster_ip,
                "clusterIPs": [cluster_ip],
                "ipFamilies": ["IPv4"],
                "ipFamilyPolicy": "SingleStack",
                "internalTrafficPolicy": "Cluster",
                "sessionAffinity": "None",
                "selector": {"app": name},
                "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}]
            },
            "status": {"loadBalancer": {}}
        })
    }

    pub fn endpoint_slice(namespace: &str, name: &str, service: &str, ips: &[&str]) -> Value {
        let endpoints: Vec<Value> = ips
            .iter()
            .enumerate()
            .map(|(i, ip)| {
                json!({
                    "addresses": [ip],
                    "conditions": {"ready": true, "serving": true, "terminating": false},
                    "nodeName": "node-a",
                    "zone": "z1",
                    "targetRef": {"kind": "Pod", "name": format!("{service}-{i}"), "namespace": namespace,
                                  "uid": format!("uid-pod-{service}-{i}")}
                })
            })
            .collect();
        json!({
            "metadata": {
                "name": name, "namespace": namespace,
                "uid": format!("uid-eps-{namespace}-{name}"),
                "creationTimestamp": "2026-11-01T10:00:01Z",
                "generateName": format!("{service}-"),
                "labels": {
                    "kubernetes.io/service-name": service,
                    "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"
                },
                "annotations": {"endpoints.kubernetes.io/last-change-trigger-time": "2026-11-01T10:00:01Z"},
                "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": service,
                                     "uid": format!("uid-svc-{namespace}-{service}"),
                                     "controller": true, "blockOwnerDeletion": true}]
            },
            "addressType": "IPv4",
            "endpoints": endpoints,
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]
        })
    }

    pub fn node(name: &str, ip: &str, heartbeat: &str) -> Value {
        json!({
            "metadata": {
                "name": name,
                "uid": format!("uid-node-{name}"),
                "creationTimestamp": "2026-11-01T09:00:00Z",
                "labels": {"kubernetes.io/hostname": name, "topology.kubernetes.io/zone": "z1"}
            },
            "spec": {"podCIDR": "10.244.1.0/24", "podCIDRs": ["10.244.1.0/24"]},
            "status": {
                "addresses": [{"type": "InternalIP", "address": ip}, {"type": "Hostname", "address": name}],
                "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                                "message": "kubelet is posting ready status",
                                "lastHeartbeatTime": heartbeat, "lastTransitionTime": "2026-11-01T09:00:30Z"}]
            }
        })
    }
}
