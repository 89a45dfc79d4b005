//! Real TLS on loopback: certificates made in the test, real handshakes, the real dataplane
//! session and inspection clients. Who may subscribe, who may read what, and what happens to
//! streams when a credential expires or the serving certificate rotates.

mod common;

use common::secure::{Outcome, Pki, SecureControlplane, subscribe_once};
use common::*;
use kpx_auth::certs::Leaf;
use kpx_auth::client::ClientCredentials;
use kpx_controlplane::Security;
use kpx_proto::v1 as pb;
use std::time::{Duration, SystemTime};
use tonic::Code;

/// A cluster with one service and endpoints on two nodes.
fn populate(cp: &SecureControlplane) {
    cp.send(node_event("node-1", None));
    cp.send(node_event("node-2", None));
    cp.send(service_event(cluster_ip_service("demo", "web", "10.96.0.10", 80)));
    cp.send(slice_event(slice("demo", "web", "web-1", 8080, vec![endpoint("10.244.1.2", "node-1")])));
    cp.send(kpx_controlplane::model::ClusterEvent::Synced);
}

async fn start(pki: &Pki) -> SecureControlplane {
    let cp = SecureControlplane::start(Security::Flags { flags: Box::new(pki.server_flags()), api: None }, None).await;
    populate(&cp);
    cp
}

#[tokio::test]
async fn a_node_certificate_proves_that_node_only() {
    let pki = Pki::new();
    let cp = start(&pki).await;
    let (node1, node2) = (pki.node("node-1"), pki.node("node-2"));

    let ok = subscribe_once(&cp.https(), &pki.client(Some(&node1)), "node-1").await;
    assert!(matches!(ok, Outcome::Synced), "node-1 with its own certificate: {ok:?}");

    let impersonation = subscribe_once(&cp.https(), &pki.client(Some(&node2)), "node-1").await;
    assert_eq!(impersonation.code(), Some(Code::PermissionDenied), "{impersonation:?}");
    assert!(impersonation.message().contains("may subscribe only as itself"), "{}", impersonation.message());
    assert_eq!(cp.metric("kpx_grpc_access_denied_total{reason=\"node_mismatch\"}").await, 1.0);

    // An admin certificate reads everything but programs nothing.
    let admin = subscribe_once(&cp.https(), &pki.client(Some(&pki.admin())), "node-1").await;
    assert_eq!(admin.code(), Some(Code::PermissionDenied), "{admin:?}");

    let anonymous = subscribe_once(&cp.https(), &pki.client(None), "node-1").await;
    assert_eq!(anonymous.code(), Some(Code::Unauthenticated), "{anonymous:?}");
}

#[tokio::test]
async fn untrusted_expired_and_plaintext_clients_are_refused() {
    let pki = Pki::new();
    let cp = start(&pki).await;
    let before = cp.metric("kpx_grpc_connections_rejected_total{reason=\"handshake_failed\"}").await;

    // A certificate from another CA, for the right node name.
    let other = Pki::new();
    let foreign = other.node("node-1");
    let creds = ClientCredentials { cert: pki.client(Some(&foreign)).cert, ..pki.client(None) };
    let outcome = subscribe_once(&cp.https(), &creds, "node-1").await;
    assert!(!matches!(outcome, Outcome::Synced), "a foreign CA's certificate synced");

    // The right CA, but expired yesterday.
    let mut leaf = Leaf::node("node-1", 1);
    leaf.not_before = SystemTime::now() - Duration::from_secs(3 * 86_400);
    leaf.not_after = SystemTime::now() - Duration::from_secs(86_400);
    let expired = pki.issue("expired", &leaf);
    let outcome = subscribe_once(&cp.https(), &pki.client(Some(&expired)), "node-1").await;
    assert!(!matches!(outcome, Outcome::Synced), "an expired certificate synced");
    let after = cp.metric("kpx_grpc_connections_rejected_total{reason=\"handshake_failed\"}").await;
    assert_eq!(after - before, 2.0, "both handshakes failed at the server");

    // The client refuses a server it cannot verify (no CA given would be a config error).
    let wrong_ca = other.client(Some(&pki.node("node-1")));
    let outcome = subscribe_once(&cp.https(), &wrong_ca, "node-1").await;
    assert!(outcome.message().contains("certificate"), "{}", outcome.message());

    // Plaintext against a TLS port.
    let outcome = subscribe_once(&cp.http(), &ClientCredentials::default(), "node-1").await;
    assert!(!matches!(outcome, Outcome::Synced));
}

#[tokio::test]
async fn inspection_is_authorized_per_caller() {
    let pki = Pki::new();
    let cp = start(&pki).await;
    let node1 = pki.node("node-1");
    // Wait until the state is published (node-1 syncing proves it).
    assert!(matches!(subscribe_once(&cp.https(), &pki.client(Some(&node1)), "node-1").await, Outcome::Synced));
    let inspect = |creds: ClientCredentials| {
        let url = cp.https();
        async move {
            let channel = kpx_auth::client::connect(&url, &creds, |e| e).await.unwrap();
            pb::inspect_client::InspectClient::new(channel)
        }
    };
    let get = |node: &str| pb::GetNodeStateRequest { node_name: node.into() };
    let web = || pb::GetServiceRequest { namespace: "demo".into(), name: "web".into() };

    let mut as_node = inspect(pki.client(Some(&node1))).await;
    as_node.get_node_state(get("node-1")).await.expect("a node reads its own state");
    let err = as_node.get_node_state(get("node-2")).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let err = as_node.watch_node_state(get("node-2")).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let err = as_node.get_service(web()).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "a service spans nodes: {err:?}");
    let listed = as_node.list_nodes(pb::ListNodesRequest {}).await.unwrap().into_inner().nodes;
    assert_eq!(listed.iter().map(|n| n.name.as_str()).collect::<Vec<_>>(), ["node-1"], "a node lists only itself");

    let mut as_admin = inspect(pki.client(Some(&pki.admin()))).await;
    as_admin.get_node_state(get("node-2")).await.expect("admins read every node");
    as_admin.get_service(web()).await.expect("and services");
    assert_eq!(as_admin.list_nodes(pb::ListNodesRequest {}).await.unwrap().into_inner().nodes.len(), 2);

    // A certificate that is neither a node's nor an admin's, and no apiserver to ask.
    let carol = pki.issue("carol", &Leaf::new("carol", 1).in_group("developers"));
    let err = inspect(pki.client(Some(&carol))).await.list_nodes(pb::ListNodesRequest {}).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");

    let mut anonymous = inspect(pki.client(None)).await;
    let err = anonymous.list_nodes(pb::ListNodesRequest {}).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    // Health stays open to probes without a credential.
    let channel = kpx_auth::client::connect(&cp.https(), &pki.client(None), |e| e).await.unwrap();
    let health = tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest { service: String::new() })
        .await
        .expect("health answers anonymous callers");
    assert_eq!(health.into_inner().status, 1, "SERVING");
}

#[tokio::test]
async fn a_stream_ends_when_its_certificate_expires() {
    let pki = Pki::new();
    let cp = start(&pki).await;
    let mut leaf = Leaf::node("node-1", 1);
    leaf.not_after = SystemTime::now() + Duration::from_secs(3);
    let short = pki.issue("short", &leaf);
    let mut node = SimNode::new("node-1", Box::new(Accept));
    node.connect_with(&cp.https(), &pki.client(Some(&short))).await;
    assert!(matches!(node.next().await, kpx_dataplane::stream::SyncEvent::Applied { .. }));
    match node.ended(Duration::from_secs(10)).await {
        kpx_dataplane::stream::StreamError::Stream(s) => {
            assert_eq!(s.code(), Code::Unauthenticated);
            assert!(s.message().contains("expired"), "{}", s.message());
        }
        e => panic!("expected the controlplane to end the stream at the certificate's expiry, got {e}"),
    }
}

/// The leaf certificate the server presents to a new handshake now.
async fn served_certificate(cp: &SecureControlplane, pki: &Pki) -> Vec<u8> {
    let tcp = tokio::net::TcpStream::connect(cp.addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let tls = tokio_rustls::TlsConnector::from(pki.rustls_client()).connect(name, tcp).await.unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

fn der_of(pem: &std::path::Path) -> Vec<u8> {
    kpx_auth::pem::read_certs("certificate file", pem).unwrap()[0].to_vec()
}

/// Replaces `path` atomically, as a Secret volume update does.
fn replace(path: &std::path::Path, text: &str) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[tokio::test]
async fn the_serving_certificate_rotates_without_dropping_streams() {
    let pki = Pki::new();
    let flags = pki.server_flags();
    let (cert, key) = (flags.tls_cert_file.clone().unwrap(), flags.tls_private_key_file.clone().unwrap());
    let cp = SecureControlplane::start(Security::Flags { flags: Box::new(flags), api: None }, None).await;
    populate(&cp);
    assert_eq!(served_certificate(&cp, &pki).await, der_of(&cert));
    let mut node = SimNode::new("node-1", Box::new(Accept));
    node.connect_with(&cp.https(), &pki.client(Some(&pki.node("node-1")))).await;
    assert!(matches!(node.next().await, kpx_dataplane::stream::SyncEvent::Applied { full: true, .. }));

    let names = (vec!["localhost".to_string()], vec!["127.0.0.1".parse().unwrap()]);
    let renewed = pki.ca.issue(&Leaf::server("kpx-controlplane-renewed", &names.0, &names.1, 1)).unwrap();
    replace(&key, &renewed.key_pem);
    replace(&cert, &renewed.cert_pem);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while served_certificate(&cp, &pki).await != der_of(&cert) {
        assert!(tokio::time::Instant::now() < deadline, "new handshakes still get the old certificate");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(cp.metric("kpx_tls_certificate_reloads_total{result=\"success\"}").await, 1.0);

    // The node's stream survived: the next change reaches it as a delta on the same stream.
    let eps = vec![endpoint("10.244.1.2", "node-1"), endpoint("10.244.1.3", "node-1")];
    cp.send(slice_event(slice("demo", "web", "web-1", 8080, eps)));
    match node.next().await {
        kpx_dataplane::stream::SyncEvent::Applied { full, .. } => assert!(!full, "a delta, not a new snapshot"),
        e => panic!("expected the change on the open stream, got {e:?}"),
    }

    // A certificate written without its key does not load: the renewed one stays in service.
    let serving = der_of(&cert);
    let orphan = pki.ca.issue(&Leaf::server("orphan", &names.0, &names.1, 1)).unwrap();
    replace(&cert, &orphan.cert_pem);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while cp.metric("kpx_tls_certificate_reloads_total{result=\"failure\"}").await < 1.0 {
        assert!(tokio::time::Instant::now() < deadline, "the broken rotation was not noticed");
        served_certificate(&cp, &pki).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(served_certificate(&cp, &pki).await, serving);
}
