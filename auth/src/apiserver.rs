//! The three apiserver calls of the token path: TokenReview (is this bearer token valid, and
//! whose is it), SubjectAccessReview (may this user do this) and, for nodes whose token does not
//! name its node, a `get` of the pod the token was issued for. The requests are the real
//! `authentication.k8s.io/v1` and `authorization.k8s.io/v1` objects (k8s-openapi types), as
//! kube-rbac-proxy and the kubelet send them.

use crate::identity::UserInfo;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec, SubjectAccessReviewStatus,
};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, PostParams};

#[derive(Debug, thiserror::Error)]
#[error("{call}: {reason}")]
pub struct ApiError {
    pub call: &'static str,
    pub reason: String,
}

/// Where a pod runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodPlacement {
    pub node_name: String,
    pub uid: String,
}

/// The apiserver as the token path sees it; [`KubeApi`] is the real one.
#[tonic::async_trait]
pub trait ApiServer: Send + Sync + std::fmt::Debug {
    async fn review_token(&self, token: &str, audiences: &[String]) -> Result<TokenReviewStatus, ApiError>;
    async fn review_access(
        &self,
        user: &UserInfo,
        attributes: ResourceAttributes,
    ) -> Result<SubjectAccessReviewStatus, ApiError>;
    async fn pod(&self, namespace: &str, name: &str) -> Result<PodPlacement, ApiError>;
}

#[derive(Clone)]
pub struct KubeApi {
    client: kube::Client,
}

impl std::fmt::Debug for KubeApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KubeApi")
    }
}

impl KubeApi {
    pub fn new(client: kube::Client) -> Self {
        KubeApi { client }
    }

    /// From a kubeconfig file, or in-cluster config / `$KUBECONFIG` when None.
    pub async fn connect(kubeconfig: Option<&std::path::Path>) -> Result<Self, ApiError> {
        let err = |reason: String| ApiError { call: "apiserver client", reason };
        let config = match kubeconfig {
            Some(path) => {
                let file = kube::config::Kubeconfig::read_from(path)
                    .map_err(|e| err(format!("kubeconfig {}: {e}", path.display())))?;
                kube::Config::from_custom_kubeconfig(file, &kube::config::KubeConfigOptions::default())
                    .await
                    .map_err(|e| err(format!("kubeconfig {}: {e}", path.display())))?
            }
            None => kube::Config::infer().await.map_err(|e| err(e.to_string()))?,
        };
        Ok(KubeApi::new(kube::Client::try_from(config).map_err(|e| err(e.to_string()))?))
    }
}

#[tonic::async_trait]
impl ApiServer for KubeApi {
    async fn review_token(&self, token: &str, audiences: &[String]) -> Result<TokenReviewStatus, ApiError> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_string()),
                audiences: (!audiences.is_empty()).then(|| audiences.to_vec()),
            },
            ..TokenReview::default()
        };
        let api: Api<TokenReview> = Api::all(self.client.clone());
        let answer = api
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| ApiError { call: "TokenReview", reason: e.to_string() })?;
        Ok(answer.status.unwrap_or_default())
    }

    async fn review_access(
        &self,
        user: &UserInfo,
        attributes: ResourceAttributes,
    ) -> Result<SubjectAccessReviewStatus, ApiError> {
        let review = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: Some(user.username.clone()),
                uid: (!user.uid.is_empty()).then(|| user.uid.clone()),
                groups: Some(user.groups.clone()),
                extra: (!user.extra.is_empty()).then(|| user.extra.clone()),
                resource_attributes: Some(attributes),
                ..SubjectAccessReviewSpec::default()
            },
            ..SubjectAccessReview::default()
        };
        let api: Api<SubjectAccessReview> = Api::all(self.client.clone());
        let answer = api
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| ApiError { call: "SubjectAccessReview", reason: e.to_string() })?;
        Ok(answer.status.unwrap_or_default())
    }

    async fn pod(&self, namespace: &str, name: &str) -> Result<PodPlacement, ApiError> {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
        let pod = api.get(name).await.map_err(|e| ApiError { call: "get pod", reason: e.to_string() })?;
        Ok(PodPlacement {
            node_name: pod.spec.and_then(|s| s.node_name).unwrap_or_default(),
            uid: pod.metadata.uid.unwrap_or_default(),
        })
    }
}
