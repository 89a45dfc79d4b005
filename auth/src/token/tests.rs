//! The token path against an in-memory apiserver that counts its calls (the real HTTP objects
//! are checked in tests/apiserver.rs).

use super::*;
use crate::apiserver::PodPlacement;
use k8s_openapi::api::authentication::v1::{TokenReviewStatus, UserInfo as K8sUser};
use k8s_openapi::api::authorization::v1::{ResourceAttributes, SubjectAccessReviewStatus};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};

#[derive(Debug, Default)]
struct Fake {
    /// token -> (audiences it was issued for, user)
    tokens: HashMap<String, (Vec<String>, K8sUser)>,
    pods: HashMap<String, PodPlacement>,
    reviews: AtomicUsize,
    pod_gets: AtomicUsize,
}

#[tonic::async_trait]
impl ApiServer for Fake {
    async fn review_token(&self, token: &str, audiences: &[String]) -> Result<TokenReviewStatus, ApiError> {
        self.reviews.fetch_add(1, Ordering::SeqCst);
        let default = vec!["https://kubernetes.default.svc".to_string()];
        let wanted = if audiences.is_empty() { &default } else { &audiences.to_vec() };
        match self.tokens.get(token) {
            Some((issued, user)) if issued.iter().any(|a| wanted.contains(a)) => Ok(TokenReviewStatus {
                authenticated: Some(true),
                user: Some(user.clone()),
                audiences: Some(wanted.clone()),
                ..Default::default()
            }),
            Some(_) => Ok(TokenReviewStatus { error: Some("token audiences is invalid".into()), ..Default::default() }),
            None => Ok(TokenReviewStatus { error: Some("invalid bearer token".into()), ..Default::default() }),
        }
    }

    async fn review_access(&self, _: &UserInfo, _: ResourceAttributes) -> Result<SubjectAccessReviewStatus, ApiError> {
        unreachable!("not used by the token path")
    }

    async fn pod(&self, _: &str, name: &str) -> Result<PodPlacement, ApiError> {
        self.pod_gets.fetch_add(1, Ordering::SeqCst);
        self.pods.get(name).cloned().ok_or_else(|| ApiError { call: "get pod", reason: "NotFound".into() })
    }
}

const DATAPLANE: &str = "system:serviceaccount:kpx-system:kpx-dataplane";

fn user(name: &str, extra: &[(&str, &str)]) -> K8sUser {
    let extra: BTreeMap<String, Vec<String>> =
        extra.iter().map(|(k, v)| (k.to_string(), vec![v.to_string()])).collect();
    K8sUser { username: Some(name.into()), extra: Some(extra), ..Default::default() }
}

/// A JWT-shaped token (unsigned: only the apiserver checks signatures) with these claims.
fn jwt(claims: serde_json::Value) -> String {
    let enc = |v: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
    format!("{}.{}.sig", enc(br#"{"alg":"RS256"}"#), enc(claims.to_string().as_bytes()))
}

fn authenticator(fake: Fake, lookup_pods: bool) -> (Arc<Fake>, TokenAuthenticator) {
    let fake = Arc::new(fake);
    let mut config = TokenConfig::new("kpx".into(), ("kpx-system".into(), "kpx-dataplane".into()));
    config.lookup_pods = lookup_pods;
    config.cache_size = 64;
    (fake.clone(), TokenAuthenticator::new(fake, config))
}

fn kpx() -> Vec<String> {
    vec!["kpx".to_string()]
}

#[tokio::test]
async fn a_node_token_names_its_node_and_is_cached_until_it_expires() {
    let exp = SystemTime::now() + Duration::from_secs(3600);
    let secs = exp.duration_since(UNIX_EPOCH).unwrap().as_secs();
    let token = jwt(serde_json::json!({ "exp": secs }));
    let mut fake = Fake::default();
    fake.tokens.insert(token.clone(), (kpx(), user(DATAPLANE, &[(EXTRA_NODE_NAME, "node-a")])));
    let (fake, auth) = authenticator(fake, false);
    let found = auth.authenticate(&token).await.unwrap();
    assert_eq!(found.identity, Identity::Node { name: "node-a".into(), via: Via::Token });
    assert_eq!(found.expires, Some(UNIX_EPOCH + Duration::from_secs(secs)));
    auth.authenticate(&token).await.unwrap();
    assert_eq!(fake.reviews.load(Ordering::SeqCst), 1, "the second call is answered from the cache");
}

#[tokio::test]
async fn older_clusters_resolve_the_node_through_the_pod() {
    let token = jwt(serde_json::json!({ "kubernetes.io": { "pod": { "name": "kpx-dp-1", "uid": "u1" } } }));
    let replaced = jwt(serde_json::json!({ "kubernetes.io": { "pod": { "name": "kpx-dp-2", "uid": "old" } } }));
    let mut fake = Fake::default();
    fake.tokens.insert(token.clone(), (kpx(), user(DATAPLANE, &[])));
    fake.tokens
        .insert(replaced.clone(), (kpx(), user(DATAPLANE, &[(EXTRA_POD_NAME, "kpx-dp-2"), (EXTRA_POD_UID, "old")])));
    fake.pods.insert("kpx-dp-1".into(), PodPlacement { node_name: "node-b".into(), uid: "u1".into() });
    fake.pods.insert("kpx-dp-2".into(), PodPlacement { node_name: "node-c".into(), uid: "new".into() });
    let (fake, auth) = authenticator(fake, true);
    let found = auth.authenticate(&token).await.unwrap();
    assert_eq!(found.identity, Identity::Node { name: "node-b".into(), via: Via::Token });
    assert_eq!(found.expires, None, "no exp claim");
    let err = auth.authenticate(&replaced).await.unwrap_err();
    assert_eq!(err.to_string(), "the token's pod kpx-system/kpx-dp-2 was replaced by another");
    assert_eq!(fake.pod_gets.load(Ordering::SeqCst), 2);

    // Without pod lookups (the dataplane's Admin API), such a token names no node.
    let mut fake = Fake::default();
    fake.tokens.insert(token.clone(), (kpx(), user(DATAPLANE, &[])));
    let (fake, auth) = authenticator(fake, false);
    let err = auth.authenticate(&token).await.unwrap_err();
    assert!(err.to_string().contains("names no node"), "{err}");
    assert_eq!(fake.pod_gets.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn other_tokens_are_users_and_bad_ones_are_rejected_briefly() {
    let mut fake = Fake::default();
    fake.tokens.insert("alice".into(), (vec!["https://kubernetes.default.svc".into()], user("alice", &[])));
    fake.tokens.insert("other-sa".into(), (kpx(), user("system:serviceaccount:default:x", &[])));
    let (fake, auth) = authenticator(fake, true);
    let alice = auth.authenticate("alice").await.unwrap();
    assert!(matches!(&alice.identity, Identity::User { user, .. } if user.username == "alice"));
    let sa = auth.authenticate("other-sa").await.unwrap();
    assert!(matches!(&sa.identity, Identity::User { user, .. } if user.username.ends_with(":default:x")));

    let before = fake.reviews.load(Ordering::SeqCst);
    let err = auth.authenticate("forged").await.unwrap_err();
    assert_eq!(err.to_string(), "the apiserver rejected the token: invalid bearer token");
    auth.authenticate("forged").await.unwrap_err();
    assert_eq!(fake.reviews.load(Ordering::SeqCst) - before, 2, "two audiences asked once, then cached");
}

#[tokio::test]
async fn expired_tokens_are_not_cached_and_the_cache_is_bounded() {
    let past = jwt(serde_json::json!({ "exp": 1 }));
    let mut fake = Fake::default();
    fake.tokens.insert(past.clone(), (kpx(), user(DATAPLANE, &[(EXTRA_NODE_NAME, "node-a")])));
    for i in 0..200 {
        fake.tokens.insert(format!("t{i}"), (kpx(), user(&format!("u{i}"), &[])));
    }
    let (fake, auth) = authenticator(fake, false);
    // The apiserver decides validity; an already expired exp only means nothing is cached.
    auth.authenticate(&past).await.unwrap();
    auth.authenticate(&past).await.unwrap();
    assert_eq!(fake.reviews.load(Ordering::SeqCst), 2);
    for i in 0..200 {
        auth.authenticate(&format!("t{i}")).await.unwrap();
        auth.authenticate(&format!("bad{i}")).await.unwrap_err();
    }
    let (accepted, rejected) = auth.cached();
    assert_eq!(accepted, 64, "capacity 64");
    assert_eq!(rejected, 64, "failures: capacity/8, at least 64");
}
