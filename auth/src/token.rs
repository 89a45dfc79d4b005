//! Bearer tokens, checked by the apiserver (TokenReview) and cached.
//!
//! A node proves itself with a projected ServiceAccount token whose audience is kpx's
//! (`--token-audience`): the token must belong to the dataplane's ServiceAccount, and its node is
//! the review's `authentication.kubernetes.io/node-name` extra (Kubernetes 1.30+) or, on older
//! clusters, the node of the pod the token was issued for (one `get` of that pod). Any other
//! valid token, of kpx's audience or of the apiserver's (a person's kubeconfig token), is a user
//! whose inspections are authorized by SubjectAccessReview.
//!
//! Answers are cached by the token's SHA-256 (never the token itself): successes until the
//! token expires but at most `max_ttl`, so that a deleted pod's token stops opening streams soon
//! after; failures briefly, so that a client retrying a bad token costs one review per
//! `negative_ttl`. Both caches are bounded and reviews in flight are capped.

use crate::apiserver::{ApiError, ApiServer};
use crate::identity::{Identity, UserInfo, Via};
use crate::ttl_cache::TtlCache;
use base64::Engine;
use sha2::{Digest, Sha256};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::Semaphore;

pub const EXTRA_NODE_NAME: &str = "authentication.kubernetes.io/node-name";
pub const EXTRA_POD_NAME: &str = "authentication.kubernetes.io/pod-name";
pub const EXTRA_POD_UID: &str = "authentication.kubernetes.io/pod-uid";

#[derive(Clone, Debug)]
pub struct TokenConfig {
    /// The audience node tokens are issued for (`--token-audience`).
    pub audience: String,
    /// The dataplane's ServiceAccount, `namespace/name` (`--node-service-account`).
    pub node_service_account: (String, String),
    /// Whether a node token without the node-name extra may be resolved through its pod (the
    /// controlplane has `get pods` in the dataplane's namespace; the dataplane does not).
    pub lookup_pods: bool,
    pub cache_size: usize,
    pub max_ttl: Duration,
    pub negative_ttl: Duration,
    pub max_in_flight: usize,
}

impl TokenConfig {
    pub fn new(audience: String, node_service_account: (String, String)) -> Self {
        TokenConfig {
            audience,
            node_service_account,
            lookup_pods: false,
            cache_size: 20_000,
            max_ttl: Duration::from_secs(600),
            negative_ttl: Duration::from_secs(10),
            max_in_flight: 64,
        }
    }
}

/// An authenticated token: who, and until when the credential is valid.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Authenticated {
    pub identity: Identity,
    pub expires: Option<SystemTime>,
}

#[derive(Clone, Debug, thiserror::Error)]
pub enum TokenError {
    /// The apiserver says no (or the token is not a node's where a node's is needed).
    #[error("{0}")]
    Rejected(String),
    /// The apiserver could not be asked; the caller may retry.
    #[error("cannot verify the token: {0}")]
    Unavailable(String),
}

type Key = [u8; 32];

#[derive(Debug)]
pub struct TokenAuthenticator {
    api: Arc<dyn ApiServer>,
    config: TokenConfig,
    accepted: Mutex<TtlCache<Key, Authenticated>>,
    rejected: Mutex<TtlCache<Key, String>>,
    in_flight: Semaphore,
}

impl TokenAuthenticator {
    pub fn new(api: Arc<dyn ApiServer>, config: TokenConfig) -> Self {
        TokenAuthenticator {
            api,
            accepted: Mutex::new(TtlCache::new(config.cache_size)),
            // Failures are cheap to repeat and cheap to forge: a smaller cache suffices.
            rejected: Mutex::new(TtlCache::new((config.cache_size / 8).max(64))),
            in_flight: Semaphore::new(config.max_in_flight.max(1)),
            config,
        }
    }

    pub fn api(&self) -> &Arc<dyn ApiServer> {
        &self.api
    }

    pub fn audience(&self) -> &str {
        &self.config.audience
    }

    /// Cached answers held now (both kinds), for tests and metrics.
    pub fn cached(&self) -> (usize, usize) {
        (lock(&self.accepted).len(), lock(&self.rejected).len())
    }

    pub async fn authenticate(&self, token: &str) -> Result<Authenticated, TokenError> {
        let key: Key = Sha256::digest(token.as_bytes()).into();
        let now = Instant::now();
        if let Some(hit) = lock(&self.accepted).get(&key, now) {
            return Ok(hit);
        }
        if let Some(reason) = lock(&self.rejected).get(&key, now) {
            return Err(TokenError::Rejected(reason));
        }
        let _permit = self.in_flight.acquire().await.map_err(|_| TokenError::Unavailable("shutting down".into()))?;
        match self.review(token).await {
            Ok(found) => {
                let cap = SystemTime::now() + self.config.max_ttl;
                let until = found.expires.map_or(cap, |e| e.min(cap));
                let ttl = until.duration_since(SystemTime::now()).unwrap_or_default();
                lock(&self.accepted).insert(key, found.clone(), Instant::now() + ttl, Instant::now());
                Ok(found)
            }
            Err(TokenError::Rejected(reason)) => {
                let until = Instant::now() + self.config.negative_ttl;
                lock(&self.rejected).insert(key, reason.clone(), until, Instant::now());
                Err(TokenError::Rejected(reason))
            }
            Err(e) => Err(e),
        }
    }

    async fn review(&self, token: &str) -> Result<Authenticated, TokenError> {
        let unavailable = |e: ApiError| TokenError::Unavailable(e.to_string());
        let audience = vec![self.config.audience.clone()];
        let ours = self.api.review_token(token, &audience).await.map_err(unavailable)?;
        let expires = jwt_expiry(token);
        if ours.authenticated == Some(true) {
            let user = user_info(ours.user);
            if user.username == self.node_user() {
                let name = self.node_of(&user, token).await?;
                return Ok(Authenticated { identity: Identity::Node { name, via: Via::Token }, expires });
            }
            return Ok(Authenticated { identity: Identity::User { user, via: Via::Token }, expires });
        }
        // Not one of ours: a person's token for the apiserver's own audience is still a user.
        let theirs = self.api.review_token(token, &[]).await.map_err(unavailable)?;
        if theirs.authenticated == Some(true) {
            let user = user_info(theirs.user);
            return Ok(Authenticated { identity: Identity::User { user, via: Via::Token }, expires });
        }
        let why = ours.error.or(theirs.error).filter(|e| !e.is_empty()).unwrap_or_else(|| "not authenticated".into());
        Err(TokenError::Rejected(format!("the apiserver rejected the token: {why}")))
    }

    fn node_user(&self) -> String {
        let (ns, name) = &self.config.node_service_account;
        format!("system:serviceaccount:{ns}:{name}")
    }

    /// The node a dataplane token belongs to.
    async fn node_of(&self, user: &UserInfo, token: &str) -> Result<String, TokenError> {
        let first = |k: &str| user.extra.get(k).and_then(|v| v.first()).filter(|v| !v.is_empty()).cloned();
        if let Some(node) = first(EXTRA_NODE_NAME) {
            return Ok(node);
        }
        let claims = jwt_pod(token);
        let pod = first(EXTRA_POD_NAME).or_else(|| claims.as_ref().map(|c| c.0.clone()));
        let uid = first(EXTRA_POD_UID).or_else(|| claims.map(|c| c.1));
        let Some(pod) = pod.filter(|_| self.config.lookup_pods) else {
            return Err(TokenError::Rejected(format!(
                "the token of {} names no node (it is not bound to a pod, or the cluster predates the {EXTRA_NODE_NAME} extra)",
                user.username
            )));
        };
        let ns = &self.config.node_service_account.0;
        let placement = self.api.pod(ns, &pod).await.map_err(|e| match e.reason.contains("NotFound") {
            true => TokenError::Rejected(format!("the token's pod {ns}/{pod} no longer exists")),
            false => TokenError::Unavailable(e.to_string()),
        })?;
        if uid.as_ref().is_some_and(|u| *u != placement.uid) {
            return Err(TokenError::Rejected(format!("the token's pod {ns}/{pod} was replaced by another")));
        }
        match placement.node_name.is_empty() {
            true => Err(TokenError::Rejected(format!("the token's pod {ns}/{pod} is not scheduled to a node"))),
            false => Ok(placement.node_name),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn user_info(user: Option<k8s_openapi::api::authentication::v1::UserInfo>) -> UserInfo {
    let u = user.unwrap_or_default();
    UserInfo {
        username: u.username.unwrap_or_default(),
        uid: u.uid.unwrap_or_default(),
        groups: u.groups.unwrap_or_default(),
        extra: u.extra.unwrap_or_default(),
    }
}

/// The claims of a JWT, read without checking the signature: only used after the apiserver
/// accepted the token, so they are the apiserver's own.
fn jwt_claims(token: &str) -> Option<serde_json::Value> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// When the token stops being valid (`exp`); None for tokens that are not JWTs.
pub fn jwt_expiry(token: &str) -> Option<SystemTime> {
    let exp = jwt_claims(token)?.get("exp")?.as_u64()?;
    Some(UNIX_EPOCH + Duration::from_secs(exp))
}

/// The pod a bound ServiceAccount token was issued for: (name, uid).
fn jwt_pod(token: &str) -> Option<(String, String)> {
    let claims = jwt_claims(token)?;
    let pod = claims.get("kubernetes.io")?.get("pod")?;
    let text = |k: &str| pod.get(k).and_then(|v| v.as_str()).map(str::to_string);
    Some((text("name")?, text("uid").unwrap_or_default()))
}

#[cfg(test)]
mod tests;
