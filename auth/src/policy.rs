//! Authentication: from a connection's client certificate or a request's bearer token to a
//! [`Caller`].

use crate::apiserver::ApiServer;
use crate::authz::{Authorizer, Caller};
use crate::identity::{Identity, UserInfo, Via};
use crate::listener::ConnInfo;
use crate::metrics::AuthMetrics;
use crate::token::{TokenAuthenticator, TokenError};
use std::sync::Arc;
use tonic::Status;

#[derive(Debug)]
pub struct Policy {
    /// Nobody is authenticated; everyone may do everything.
    open: bool,
    /// Certificate organizations (groups) whose members may inspect everything.
    admin_groups: Vec<String>,
    tokens: Option<TokenAuthenticator>,
    authorizer: Arc<Authorizer>,
    pub(crate) metrics: AuthMetrics,
}

impl Policy {
    /// A server that authenticates nobody (plaintext on loopback, or `--insecure`).
    pub fn open(metrics: AuthMetrics) -> Self {
        Policy {
            open: true,
            admin_groups: Vec::new(),
            tokens: None,
            authorizer: Arc::new(Authorizer::new(None, metrics.clone())),
            metrics,
        }
    }

    /// A server that knows its callers by certificate (verified by the TLS layer against the
    /// client CA) and, when `tokens` is set, by bearer token; users that are neither nodes nor
    /// admins are authorized by SubjectAccessReview when an apiserver is at hand.
    pub fn enforcing(
        admin_groups: Vec<String>,
        tokens: Option<TokenAuthenticator>,
        api: Option<Arc<dyn ApiServer>>,
        metrics: AuthMetrics,
    ) -> Self {
        Policy {
            open: false,
            admin_groups,
            tokens,
            authorizer: Arc::new(Authorizer::new(api, metrics.clone())),
            metrics,
        }
    }

    pub fn is_open(&self) -> bool {
        self.open
    }

    pub fn accepts_tokens(&self) -> bool {
        self.tokens.is_some()
    }

    pub fn tokens(&self) -> Option<&TokenAuthenticator> {
        self.tokens.as_ref()
    }

    fn caller(&self, identity: Identity, expires: Option<std::time::SystemTime>) -> Caller {
        Caller { identity, expires, authorizer: self.authorizer.clone() }
    }

    /// Who is calling. A certificate wins over a token (no apiserver round trip); no credential
    /// at all is [`Identity::Anonymous`]. Err: (metric reason, status to answer with).
    pub async fn authenticate(
        &self,
        conn: Option<&ConnInfo>,
        bearer: Option<&str>,
    ) -> Result<Caller, (&'static str, Status)> {
        if self.open {
            return Ok(self.caller(Identity::Open, None));
        }
        if let Some(cert) = conn.and_then(|c| c.certificate.as_ref()) {
            let identity = match cert.node_name() {
                Some(node) => Identity::Node { name: node.to_string(), via: Via::Certificate },
                None if cert.organizations.iter().any(|o| self.admin_groups.contains(o)) => {
                    Identity::Admin { user: cert.common_name.clone(), via: Via::Certificate }
                }
                None => Identity::User {
                    user: UserInfo {
                        username: cert.common_name.clone(),
                        groups: cert.organizations.clone(),
                        ..UserInfo::default()
                    },
                    via: Via::Certificate,
                },
            };
            return Ok(self.caller(identity, Some(cert.not_after)));
        }
        let Some(token) = bearer else {
            return Ok(self.caller(Identity::Anonymous, None));
        };
        let Some(tokens) = &self.tokens else {
            return Err((
                "tokens_not_accepted",
                Status::unauthenticated("this server does not accept bearer tokens (it has no --token-audience)"),
            ));
        };
        match tokens.authenticate(token).await {
            Ok(found) => Ok(self.caller(found.identity, found.expires)),
            Err(TokenError::Rejected(why)) => Err(("token_rejected", Status::unauthenticated(why))),
            Err(e @ TokenError::Unavailable(_)) => {
                Err(("token_review_unavailable", Status::unavailable(e.to_string())))
            }
        }
    }
}
