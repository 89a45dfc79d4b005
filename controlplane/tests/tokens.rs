//! The token path against a fake apiserver that speaks the real HTTP API: the controlplane
//! watches it (KubeSource) and sends it TokenReviews, SubjectAccessReviews and pod reads, which
//! are checked to be the real `authentication.k8s.io/v1` and `authorization.k8s.io/v1` objects.

mod common;
mod fake_apiserver;

use base64::Engine;
use common::secure::{Outcome, SecureControlplane, subscribe_once};
use fake_apiserver::auth::{ACCESS_REVIEWS, APISERVER_AUDIENCE, TOKEN_REVIEWS, TokenInfo};
use fake_apiserver::{FakeApiServer, Kind, objects};
use k8s_openapi::api::authentication::v1::TokenReview;
use k8s_openapi::api::authorization::v1::SubjectAccessReview;
use kpx_auth::apiserver::{ApiServer, KubeApi};
use kpx_auth::client::ClientCredentials;
use kpx_auth::flags::ServerFlags;
use kpx_controlplane::Security;
use kpx_controlplane::k8s::watch::KubeSource;
use kpx_controlplane::model::Skips;
use kpx_proto::v1 as pb;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tonic::Code;

const DATAPLANE: &str = "system:serviceaccount:kpx-system:kpx-dataplane";

struct Cluster {
    api: FakeApiServer,
    cp: SecureControlplane,
    tokens: tempfile::TempDir,
}

impl Cluster {
    async fn start() -> Cluster {
        let api = FakeApiServer::start().await;
        api.apply(Kind::Service, objects::service("shop", "web", "10.96.0.10"));
        api.apply(Kind::EndpointSlice, objects::endpoint_slice("shop", "web-1", "web", &["10.244.1.5"]));
        api.apply(Kind::Node, objects::node("node-a", "192.0.2.1", "2026-11-22T10:00:00Z"));
        api.apply(Kind::Node, objects::node("node-b", "192.0.2.2", "2026-11-22T10:00:00Z"));
        let flags = ServerFlags { token_audience: Some("kpx".into()), ..ServerFlags::default() };
        let reviews: Arc<dyn ApiServer> = Arc::new(KubeApi::new(api.client()));
        let source = Box::new(KubeSource::new(api.client(), Arc::new(Skips::default())));
        let cp =
            SecureControlplane::start(Security::Flags { flags: Box::new(flags), api: Some(reviews) }, Some(source))
                .await;
        Cluster { api, cp, tokens: tempfile::tempdir().unwrap() }
    }

    /// Client credentials sending `token` (plaintext is allowed to loopback).
    fn with_token(&self, token: &str) -> ClientCredentials {
        let path = self.tokens.path().join(format!("t{}", token.len() + token.as_bytes()[0] as usize));
        std::fs::write(&path, token).unwrap();
        ClientCredentials::from_files(None, None, None, Some(&path))
    }

    fn reviews(&self, path: &str) -> Vec<serde_json::Value> {
        self.api.auth(|a| a.requests.iter().filter(|(p, _)| p == path).map(|(_, v)| v.clone()).collect())
    }

    async fn inspect(&self, token: &str) -> pb::inspect_client::InspectClient<kpx_auth::client::AuthChannel> {
        let channel = kpx_auth::client::connect(&self.cp.http(), &self.with_token(token), |e| e).await.unwrap();
        pb::inspect_client::InspectClient::new(channel)
    }
}

/// A JWT-shaped token with these claims (the signature is the apiserver's business).
fn jwt(claims: serde_json::Value) -> String {
    let enc = |v: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
    format!("{}.{}.sig", enc(br#"{"alg":"RS256","kid":"k"}"#), enc(claims.to_string().as_bytes()))
}

fn in_secs(s: u64) -> u64 {
    (SystemTime::now() + Duration::from_secs(s)).duration_since(UNIX_EPOCH).unwrap().as_secs()
}

#[tokio::test]
async fn node_tokens_prove_their_node() {
    let c = Cluster::start().await;
    let node_a = jwt(serde_json::json!({"exp": in_secs(3600), "sub": DATAPLANE}));
    let pod_bound =
        jwt(serde_json::json!({"exp": in_secs(3600), "kubernetes.io": {"pod": {"name": "kpx-dp-x", "uid": "p1"}}}));
    c.api.auth(|a| {
        let info = TokenInfo::new(DATAPLANE, &["kpx"]).extra("authentication.kubernetes.io/node-name", "node-a");
        a.tokens.insert(node_a.clone(), info);
        // A cluster before 1.30: no node-name extra, the node comes from the pod.
        a.tokens.insert(pod_bound.clone(), TokenInfo::new(DATAPLANE, &["kpx"]));
        a.pods.insert(("kpx-system".into(), "kpx-dp-x".into()), ("node-b".into(), "p1".into()));
    });

    let ok = subscribe_once(&c.cp.http(), &c.with_token(&node_a), "node-a").await;
    assert!(matches!(ok, Outcome::Synced), "{ok:?}");
    let stolen = subscribe_once(&c.cp.http(), &c.with_token(&node_a), "node-b").await;
    assert_eq!(stolen.code(), Some(Code::PermissionDenied), "{stolen:?}");
    assert_eq!(c.reviews(TOKEN_REVIEWS).len(), 1, "the second use of the token came from the cache");

    let ok = subscribe_once(&c.cp.http(), &c.with_token(&pod_bound), "node-b").await;
    assert!(matches!(ok, Outcome::Synced), "{ok:?}");
    let pod_reads = c.api.auth(|a| a.requests.iter().filter(|(p, _)| p.contains("/pods/")).count());
    assert_eq!(pod_reads, 1);

    // The requests are real TokenReview objects asking for kpx's audience.
    for body in c.reviews(TOKEN_REVIEWS) {
        assert_eq!(
            (body["apiVersion"].as_str(), body["kind"].as_str()),
            (Some("authentication.k8s.io/v1"), Some("TokenReview"))
        );
        let review: TokenReview = serde_json::from_value(body).expect("a TokenReview");
        assert_eq!(review.spec.audiences, Some(vec!["kpx".to_string()]));
        assert!(review.spec.token.is_some_and(|t| t == node_a || t == pod_bound));
    }
    assert_eq!(c.cp.metric("kpx_grpc_access_denied_total{reason=\"node_mismatch\"}").await, 1.0);
}

#[tokio::test]
async fn bad_expired_and_foreign_tokens_are_refused() {
    let c = Cluster::start().await;
    let short = jwt(serde_json::json!({"exp": in_secs(2)}));
    let other_sa = "other-sa-token".to_string();
    c.api.auth(|a| {
        let info = TokenInfo::new(DATAPLANE, &["kpx"]).extra("authentication.kubernetes.io/node-name", "node-a");
        a.tokens.insert(short.clone(), info);
        a.tokens.insert(other_sa.clone(), TokenInfo::new("system:serviceaccount:default:app", &["kpx"]));
    });
    let forged = subscribe_once(&c.cp.http(), &c.with_token("forged"), "node-a").await;
    assert_eq!(forged.code(), Some(Code::Unauthenticated), "{forged:?}");
    assert!(forged.message().contains("invalid bearer token"), "{}", forged.message());
    let app = subscribe_once(&c.cp.http(), &c.with_token(&other_sa), "node-a").await;
    assert_eq!(app.code(), Some(Code::PermissionDenied), "another ServiceAccount is no node: {app:?}");

    // A token that expires: its stream ends then, and once the apiserver no longer accepts it
    // the cache does not either.
    let mut node = common::SimNode::new("node-a", Box::new(common::Accept));
    node.connect_with(&c.cp.http(), &c.with_token(&short)).await;
    assert!(matches!(node.next().await, kpx_dataplane::stream::SyncEvent::Applied { .. }));
    match node.ended(Duration::from_secs(10)).await {
        kpx_dataplane::stream::StreamError::Stream(s) => assert_eq!(s.code(), Code::Unauthenticated, "{s:?}"),
        e => panic!("expected the stream to end when the token expired, got {e}"),
    }
    c.api.auth(|a| a.tokens.remove(&short));
    let again = subscribe_once(&c.cp.http(), &c.with_token(&short), "node-a").await;
    assert_eq!(again.code(), Some(Code::Unauthenticated), "an expired token is not served from the cache: {again:?}");
}

#[tokio::test]
async fn user_tokens_are_authorized_with_subject_access_reviews() {
    let c = Cluster::start().await;
    c.api.auth(|a| {
        let mut alice = TokenInfo::new("alice", &[APISERVER_AUDIENCE]);
        alice.groups = vec!["sre".into(), "system:authenticated".into()];
        a.tokens.insert("alice-token".into(), alice);
        a.allowed.insert(("alice".into(), "get".into(), "nodestates".into(), "node-a".into()));
    });
    let mut alice = c.inspect("alice-token").await;
    let get = |n: &str| pb::GetNodeStateRequest { node_name: n.into() };
    // The source may still be listing: wait until node-a's state is there.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while let Err(s) = alice.get_node_state(get("node-a")).await {
        assert_eq!(s.code(), Code::Unavailable, "{s:?}");
        assert!(tokio::time::Instant::now() < deadline, "never synced");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let err = alice.get_node_state(get("node-b")).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("may not get nodestates.kpx.io \"node-b\""), "{}", err.message());
    let err = alice.list_nodes(pb::ListNodesRequest {}).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");

    let sars = c.reviews(ACCESS_REVIEWS);
    let before_cache = sars.len();
    let review: SubjectAccessReview = serde_json::from_value(sars[0].clone()).expect("a SubjectAccessReview");
    assert_eq!(
        (sars[0]["apiVersion"].as_str(), sars[0]["kind"].as_str()),
        (Some("authorization.k8s.io/v1"), Some("SubjectAccessReview"))
    );
    assert_eq!(review.spec.user.as_deref(), Some("alice"));
    assert_eq!(review.spec.groups, Some(vec!["sre".to_string(), "system:authenticated".to_string()]));
    let attrs = review.spec.resource_attributes.unwrap();
    assert_eq!(
        (attrs.group.as_deref(), attrs.resource.as_deref(), attrs.verb.as_deref(), attrs.name.as_deref()),
        (Some("kpx.io"), Some("nodestates"), Some("get"), Some("node-a"))
    );
    // Token reviews for a person's token: kpx's audience first, then the apiserver's.
    let audiences: Vec<Option<Vec<String>>> = c
        .reviews(TOKEN_REVIEWS)
        .into_iter()
        .map(|b| serde_json::from_value::<TokenReview>(b).unwrap().spec.audiences)
        .collect();
    assert_eq!(audiences, vec![Some(vec!["kpx".to_string()]), None]);

    alice.get_node_state(get("node-a")).await.unwrap();
    assert_eq!(c.reviews(ACCESS_REVIEWS).len(), before_cache, "allowed answers are cached");
}
