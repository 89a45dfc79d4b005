//! What a proven caller may do.
//!
//! | caller | Sync (subscribe) | node state (Inspect, Admin) | all nodes, services | reflection |
//! |---|---|---|---|---|
//! | a node | as itself only | its own only | its own entry in ListNodes | yes |
//! | an admin-group certificate | no | yes | yes | yes |
//! | another user (token, or certificate with the apiserver path on) | no | SubjectAccessReview | SubjectAccessReview | yes |
//! | anonymous | no | no | no | no (health only) |
//!
//! The SubjectAccessReview asks, like kube-rbac-proxy does, for a verb on the resource
//! `nodestates` of API group `kpx.io` (named after the node when one is concerned): grant it
//! with a ClusterRole such as deploy/kustomize's `kpx-inspector`.

use crate::apiserver::ApiServer;
use crate::identity::{Identity, UserInfo};
use crate::metrics::AuthMetrics;
use crate::ttl_cache::TtlCache;
use k8s_openapi::api::authorization::v1::ResourceAttributes;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tonic::Status;

pub const API_GROUP: &str = "kpx.io";
pub const RESOURCE: &str = "nodestates";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verb {
    Get,
    List,
    Watch,
}

impl Verb {
    pub fn as_str(self) -> &'static str {
        match self {
            Verb::Get => "get",
            Verb::List => "list",
            Verb::Watch => "watch",
        }
    }
}

/// What a caller asks to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access<'a> {
    /// Open a Sync stream as this node (program its proxy state).
    Subscribe { node: &'a str },
    /// Read one node's state (Inspect GetNodeState/WatchNodeState, the node's Admin API).
    NodeState { node: &'a str, verb: Verb },
    /// List the nodes (a node sees only itself: the service filters with [`Caller::node`]).
    ListNodes,
    /// Read state that spans nodes (a service as every node sees it).
    AllNodes,
}

/// Who is calling, and the means to check what they may do. Put into each request's extensions
/// by [`crate::layer::AuthLayer`].
#[derive(Clone, Debug)]
pub struct Caller {
    pub identity: Identity,
    /// When the credential stops being valid: long-lived streams end then, and the client
    /// reconnects with its renewed one.
    pub expires: Option<SystemTime>,
    pub(crate) authorizer: Arc<Authorizer>,
}

impl Caller {
    /// The caller of a request; requests that did not pass [`crate::layer::AuthLayer`] (tests
    /// that call services directly) are treated as anonymous.
    pub fn of<T>(request: &tonic::Request<T>) -> Caller {
        request.extensions().get::<Caller>().cloned().unwrap_or_else(|| Caller {
            identity: Identity::Anonymous,
            expires: None,
            authorizer: Arc::new(Authorizer::new(None, AuthMetrics::default())),
        })
    }

    /// The node this caller is, when it is one.
    pub fn node(&self) -> Option<&str> {
        match &self.identity {
            Identity::Node { name, .. } => Some(name),
            _ => None,
        }
    }

    /// Ok, or PERMISSION_DENIED / UNAUTHENTICATED with a reason a person can act on. Denials
    /// are counted and logged (who, never the credential).
    pub async fn authorize(&self, access: Access<'_>) -> Result<(), Status> {
        let result = self.decide(access).await;
        if let Err((reason, status)) = &result {
            self.authorizer.metrics.denied(reason);
            tracing::warn!(caller = %self.identity.describe(), ?access, reason = %reason, "access denied");
            return Err(status.clone());
        }
        Ok(())
    }

    async fn decide(&self, access: Access<'_>) -> Result<(), (&'static str, Status)> {
        let deny = |reason: &'static str, message: String| Err((reason, Status::permission_denied(message)));
        let who = self.identity.describe();
        match (&self.identity, access) {
            (Identity::Open, _) => Ok(()),
            (Identity::Anonymous, _) => Err((
                "anonymous",
                Status::unauthenticated("no credential: present a client certificate or a bearer token"),
            )),
            (Identity::Node { name, .. }, Access::Subscribe { node }) => match name == node {
                true => Ok(()),
                false => deny("node_mismatch", format!("{who} may subscribe only as itself, not as node {node:?}")),
            },
            (_, Access::Subscribe { node }) => {
                deny("not_a_node", format!("{who} is not a node and may not subscribe (as node {node:?})"))
            }
            (Identity::Node { name, .. }, Access::NodeState { node, .. }) => match name == node {
                true => Ok(()),
                false => deny("node_mismatch", format!("{who} may read only its own state, not node {node:?}'s")),
            },
            (Identity::Node { .. }, Access::ListNodes) => Ok(()),
            (Identity::Node { .. }, Access::AllNodes) => {
                deny("node_scope", format!("{who} may read only its own state, not state that spans nodes"))
            }
            (Identity::Admin { .. }, _) => Ok(()),
            (Identity::User { user, .. }, access) => {
                let (verb, name) = match access {
                    Access::NodeState { node, verb } => (verb, Some(node)),
                    Access::ListNodes | Access::AllNodes => (Verb::List, None),
                    Access::Subscribe { .. } => unreachable!("handled above"),
                };
                self.authorizer.review(user, verb, name).await
            }
        }
    }
}

/// SubjectAccessReviews for users, cached (allowed for 5 minutes, denied for 30 seconds: the
/// defaults of kube-rbac-proxy and the kubelet's webhook authorizer).
#[derive(Debug)]
pub struct Authorizer {
    api: Option<Arc<dyn ApiServer>>,
    cache: Mutex<TtlCache<String, bool>>,
    pub(crate) metrics: AuthMetrics,
}

const ALLOWED_TTL: Duration = Duration::from_secs(300);
const DENIED_TTL: Duration = Duration::from_secs(30);

impl Authorizer {
    pub fn new(api: Option<Arc<dyn ApiServer>>, metrics: AuthMetrics) -> Self {
        Authorizer { api, cache: Mutex::new(TtlCache::new(4096)), metrics }
    }

    async fn review(&self, user: &UserInfo, verb: Verb, name: Option<&str>) -> Result<(), (&'static str, Status)> {
        let what = match name {
            Some(n) => format!("{} {RESOURCE}.{API_GROUP} {n:?}", verb.as_str()),
            None => format!("{} {RESOURCE}.{API_GROUP}", verb.as_str()),
        };
        let Some(api) = &self.api else {
            return Err((
                "no_authorizer",
                Status::permission_denied(format!(
                    "user {:?} is neither a node nor in an admin group, and this server has no apiserver to ask (--token-audience)",
                    user.username
                )),
            ));
        };
        let key = format!("{}\0{}\0{}\0{what}", user.username, user.uid, user.groups.join(","));
        let cached = self.cache.lock().unwrap_or_else(|e| e.into_inner()).get(&key, Instant::now());
        let allowed = match cached {
            Some(allowed) => allowed,
            None => {
                let attributes = ResourceAttributes {
                    group: Some(API_GROUP.into()),
                    resource: Some(RESOURCE.into()),
                    verb: Some(verb.as_str().into()),
                    name: name.map(str::to_string),
                    ..ResourceAttributes::default()
                };
                let status = api.review_access(user, attributes).await.map_err(|e| {
                    ("authorizer_unavailable", Status::unavailable(format!("cannot authorize {what}: {e}")))
                })?;
                let allowed = status.allowed && status.denied != Some(true);
                let ttl = if allowed { ALLOWED_TTL } else { DENIED_TTL };
                let now = Instant::now();
                self.cache.lock().unwrap_or_else(|e| e.into_inner()).insert(key, allowed, now + ttl, now);
                allowed
            }
        };
        match allowed {
            true => Ok(()),
            false => Err(("rbac", Status::permission_denied(format!("user {:?} may not {what}", user.username)))),
        }
    }
}
