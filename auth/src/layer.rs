//! The tower layer in front of every kpx gRPC service: it authenticates each request, answers
//! UNAUTHENTICATED itself when there is nothing to authorize (no credential, a bad token), and
//! hands the [`Caller`] to the services in the request's extensions. What an authenticated
//! caller may do is decided by the service ([`Caller::authorize`]), which knows the node asked
//! for. gRPC health stays open to anonymous callers (probes carry no credential); everything
//! else, reflection included, needs a proven identity.

use crate::authz::Caller;
use crate::identity::Identity;
use crate::listener::ConnInfo;
use crate::policy::Policy;
use futures::future::BoxFuture;
use std::sync::Arc;
use std::task::{Context, Poll};
use tonic::body::Body;

const HEALTH_PREFIX: &str = "/grpc.health.v1.Health/";

#[derive(Clone, Debug)]
pub struct AuthLayer {
    policy: Arc<Policy>,
}

impl AuthLayer {
    pub fn new(policy: Arc<Policy>) -> Self {
        AuthLayer { policy }
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> AuthService<S> {
        AuthService { inner, policy: self.policy.clone() }
    }
}

#[derive(Clone, Debug)]
pub struct AuthService<S> {
    inner: S,
    policy: Arc<Policy>,
}

/// The token of an `authorization: Bearer <token>` header.
fn bearer(headers: &http::HeaderMap) -> Option<String> {
    let value = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    (scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty()).then(|| token.trim().to_string())
}

impl<S> tower::Service<http::Request<Body>> for AuthService<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<http::Response<Body>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<Body>) -> Self::Future {
        // The clone is not ready; the ready one serves this request (tower's usual swap).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let policy = self.policy.clone();
        Box::pin(async move {
            let conn = request.extensions().get::<ConnInfo>().cloned();
            let token = bearer(request.headers());
            let path = request.uri().path();
            let health = path.starts_with(HEALTH_PREFIX);
            let remote = conn.as_ref().and_then(|c| c.remote);
            let caller = match policy.authenticate(conn.as_ref(), token.as_deref()).await {
                Ok(caller) => caller,
                Err((reason, status)) => {
                    policy.metrics.authentication_failed(reason);
                    tracing::warn!(?remote, path, reason, message = status.message(), "request not authenticated");
                    if !health {
                        return Ok(status.into_http());
                    }
                    Caller::of(&tonic::Request::new(()))
                }
            };
            if caller.identity == Identity::Anonymous && !health {
                policy.metrics.authentication_failed("no_credential");
                tracing::debug!(?remote, path, "request without a credential refused");
                let status = tonic::Status::unauthenticated(
                    "no credential: present a client certificate (signed by the server's client CA) or a bearer token",
                );
                return Ok(status.into_http());
            }
            if caller.identity != Identity::Anonymous
                && let Some(conn) = &conn
            {
                conn.mark_authenticated();
            }
            request.extensions_mut().insert(caller);
            inner.call(request).await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens() {
        let mut h = http::HeaderMap::new();
        assert_eq!(bearer(&h), None);
        h.insert(http::header::AUTHORIZATION, "Bearer abc.def".parse().unwrap());
        assert_eq!(bearer(&h).as_deref(), Some("abc.def"));
        h.insert(http::header::AUTHORIZATION, "bearer  x ".parse().unwrap());
        assert_eq!(bearer(&h).as_deref(), Some("x"));
        for other in ["Basic YTpi", "Bearer ", "Bearer"] {
            h.insert(http::header::AUTHORIZATION, other.parse().unwrap());
            assert_eq!(bearer(&h), None, "{other}");
        }
    }
}
