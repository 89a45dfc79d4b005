//! The apiserver's authentication and authorization endpoints, as kube-apiserver answers them:
//! `POST /apis/authentication.k8s.io/v1/tokenreviews`, `POST
//! /apis/authorization.k8s.io/v1/subjectaccessreviews` and `GET
//! /api/v1/namespaces/{ns}/pods/{name}`. Requests are kept as sent (JSON) so that tests can check
//! they are the real objects; answers follow the tokens, policy and pods a test registers.

use super::{Body, json_response, status};
use hyper::StatusCode;
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap, HashSet};

pub const TOKEN_REVIEWS: &str = "/apis/authentication.k8s.io/v1/tokenreviews";
pub const ACCESS_REVIEWS: &str = "/apis/authorization.k8s.io/v1/subjectaccessreviews";

/// What the apiserver knows of a token.
#[derive(Clone, Debug)]
pub struct TokenInfo {
    pub audiences: Vec<String>,
    pub username: String,
    pub uid: String,
    pub groups: Vec<String>,
    pub extra: BTreeMap<String, Vec<String>>,
}

impl TokenInfo {
    pub fn new(username: &str, audiences: &[&str]) -> Self {
        TokenInfo {
            audiences: audiences.iter().map(|a| a.to_string()).collect(),
            username: username.into(),
            uid: format!("uid-{username}"),
            groups: vec!["system:authenticated".into()],
            extra: BTreeMap::new(),
        }
    }

    pub fn extra(mut self, key: &str, value: &str) -> Self {
        self.extra.insert(key.into(), vec![value.into()]);
        self
    }
}

/// The apiserver's default audience (a TokenReview without audiences asks for this one).
pub const APISERVER_AUDIENCE: &str = "https://kubernetes.default.svc.cluster.local";

#[derive(Default)]
pub struct AuthState {
    pub tokens: HashMap<String, TokenInfo>,
    /// (user, verb, resource, name or "") allowed; everything else is denied.
    pub allowed: HashSet<(String, String, String, String)>,
    /// (namespace, name) -> (node, uid)
    pub pods: HashMap<(String, String), (String, String)>,
    /// Bodies received, in order: (path, JSON).
    pub requests: Vec<(String, Value)>,
}

/// Answers a request to one of the endpoints above, or None if `path` is not one of them.
pub fn handle(state: &mut AuthState, method: &hyper::Method, path: &str, body: &[u8]) -> Option<hyper::Response<Body>> {
    if let Some(rest) = path.strip_prefix("/api/v1/namespaces/")
        && let Some((ns, pod)) = rest.split_once("/pods/")
        && method == hyper::Method::GET
    {
        state.requests.push((path.to_string(), Value::Null));
        return Some(match state.pods.get(&(ns.to_string(), pod.to_string())) {
            Some((node, uid)) => json_response(
                StatusCode::OK,
                &json!({"kind": "Pod", "apiVersion": "v1",
                        "metadata": {"name": pod, "namespace": ns, "uid": uid},
                        "spec": {"nodeName": node, "containers": [{"name": "c"}]}}),
            ),
            None => status(StatusCode::NOT_FOUND, "NotFound", &format!("pods \"{pod}\" not found")),
        });
    }
    if path != TOKEN_REVIEWS && path != ACCESS_REVIEWS {
        return None;
    }
    if method != hyper::Method::POST {
        return Some(status(StatusCode::METHOD_NOT_ALLOWED, "MethodNotAllowed", "only POST"));
    }
    let Ok(request) = serde_json::from_slice::<Value>(body) else {
        return Some(status(StatusCode::BAD_REQUEST, "BadRequest", "not JSON"));
    };
    state.requests.push((path.to_string(), request.clone()));
    let mut answer = request.clone();
    answer["status"] = match path {
        TOKEN_REVIEWS => token_review(state, &request["spec"]),
        _ => access_review(state, &request["spec"]),
    };
    Some(json_response(StatusCode::CREATED, &answer))
}

fn token_review(state: &AuthState, spec: &Value) -> Value {
    let token = spec["token"].as_str().unwrap_or_default();
    let asked: Vec<String> = match spec["audiences"].as_array() {
        Some(a) if !a.is_empty() => a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect(),
        _ => vec![APISERVER_AUDIENCE.to_string()],
    };
    match state.tokens.get(token) {
        None => json!({"authenticated": false, "error": "invalid bearer token"}),
        Some(info) => {
            let common: Vec<&String> = asked.iter().filter(|a| info.audiences.contains(a)).collect();
            if common.is_empty() {
                return json!({"authenticated": false, "error": "token audiences is invalid for the target audiences"});
            }
            json!({"authenticated": true, "audiences": common,
                   "user": {"username": info.username, "uid": info.uid, "groups": info.groups, "extra": info.extra}})
        }
    }
}

fn access_review(state: &AuthState, spec: &Value) -> Value {
    let attrs = &spec["resourceAttributes"];
    let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
    let key = (text(&spec["user"]), text(&attrs["verb"]), text(&attrs["resource"]), text(&attrs["name"]));
    match state.allowed.contains(&key) {
        true => json!({"allowed": true, "reason": "RBAC: allowed by ClusterRoleBinding kpx-inspector"}),
        false => json!({"allowed": false}),
    }
}
