//! kpxctl against a fake Inspect server over real gRPC on loopback: flags in, text out, and
//! the error a person sees for an unknown node or service.

use clap::Parser;
use kpx_client::cli::Cli;
use kpx_proto::v1::inspect_server::{Inspect, InspectServer};
use kpx_proto::v1::{
    GetNodeStateRequest, GetServiceRequest, ListNodesRequest, ListNodesResponse, NodeState, NodeStatus, Service,
    ServiceAcrossNodes, ServiceType, Update,
};
use tonic::{Request, Response, Status};

struct Fake;

#[tonic::async_trait]
impl Inspect for Fake {
    async fn list_nodes(&self, _: Request<ListNodesRequest>) -> Result<Response<ListNodesResponse>, Status> {
        let node = |name: &str| NodeStatus { name: name.into(), zone: "zone-a".into(), ..Default::default() };
        Ok(Response::new(ListNodesResponse { nodes: vec![node("node-b"), node("node-a")] }))
    }

    async fn get_node_state(&self, req: Request<GetNodeStateRequest>) -> Result<Response<NodeState>, Status> {
        let name = req.into_inner().node_name;
        if name != "node-a" {
            return Err(Status::not_found(format!("no node {name}")));
        }
        Ok(Response::new(NodeState { node_name: name, version: "ab".repeat(16), services: vec![] }))
    }

    type WatchNodeStateStream = tokio_stream::Empty<Result<Update, Status>>;

    async fn watch_node_state(
        &self,
        _: Request<GetNodeStateRequest>,
    ) -> Result<Response<Self::WatchNodeStateStream>, Status> {
        Err(Status::unimplemented("not in the fake"))
    }

    async fn get_service(&self, req: Request<GetServiceRequest>) -> Result<Response<ServiceAcrossNodes>, Status> {
        let req = req.into_inner();
        if (req.namespace.as_str(), req.name.as_str()) != ("demo", "web") {
            return Err(Status::not_found("no such service"));
        }
        let service = Service {
            namespace: req.namespace,
            name: req.name,
            r#type: ServiceType::ClusterIp as i32,
            cluster_ips: vec!["10.96.0.10".into()],
            ..Default::default()
        };
        Ok(Response::new(ServiceAcrossNodes { service: Some(service), views: vec![] }))
    }
}

async fn serve() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(InspectServer::new(Fake))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    format!("http://{addr}")
}

async fn kpxctl(url: &str, args: &[&str]) -> Result<String, kpx_client::ClientError> {
    let argv = ["kpxctl", "--controlplane", url].into_iter().chain(args.iter().copied());
    kpx_client::run(Cli::try_parse_from(argv).unwrap()).await
}

#[tokio::test]
async fn queries_render_the_answers() {
    let url = serve().await;

    let nodes = kpxctl(&url, &["nodes"]).await.unwrap();
    let names: Vec<&str> = nodes.lines().skip(1).map(|l| l.split_whitespace().next().unwrap()).collect();
    assert_eq!(names, ["node-a", "node-b"], "{nodes}");

    let state = kpxctl(&url, &["state", "node-a"]).await.unwrap();
    assert_eq!(state, "node node-a, version abababababab, 0 services, 0 endpoints\nNo services.\n");

    let json = kpxctl(&url, &["service", "demo/web", "-o", "json"]).await.unwrap();
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["service"]["type"], "CLUSTER_IP");

    // The host:port shorthand works too.
    let yaml = kpxctl(url.trim_start_matches("http://"), &["-o", "yaml", "nodes"]).await.unwrap();
    assert!(yaml.contains("node-a"), "{yaml}");
}

#[tokio::test]
async fn not_found_names_what_was_asked() {
    let url = serve().await;
    let err = kpxctl(&url, &["state", "node-c"]).await.unwrap_err();
    assert_eq!(err.to_string(), "node \"node-c\" not found");
    let err = kpxctl(&url, &["service", "demo/nope"]).await.unwrap_err();
    assert_eq!(err.to_string(), "service \"demo/nope\" not found");
}
