//! Kubernetes API objects -> [`crate::model`]. This module (with [`watch`]) is the only one that
//! sees k8s-openapi: everything downstream works on the proxy's own model.
//!
//! The conversions follow kube-proxy's reading of the API (pkg/proxy/service.go,
//! endpointslicecache.go): services another proxy owns, headless and ExternalName services are
//! not proxied (`None`, not an error), and a bad value drops the smallest part that contains it
//! (one IP, one port, one endpoint) and is counted in [`Skips`], so one typo in a cluster does
//! not take a whole service down.

pub mod watch;

use crate::model::{
    self, Cidr, ClusterEvent, IpFamily, ObjectKind, Protocol, ServiceKey, ServiceType, SkipReason, Skips, SliceKey,
};
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::discovery::v1 as discovery;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Deserialize;
use serde_json::Value;
use std::net::IpAddr;

/// Services with this label are handled by another service proxy.
const LABEL_SERVICE_PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";
const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
/// Set by the EndpointSlice controller on the slices of a headless Service.
const LABEL_HEADLESS: &str = "service.kubernetes.io/headless";
/// The label selector of the EndpointSlices kpx proxies, as kube-proxy's informer has it: not a
/// headless service's, not another proxy's (the controller copies the Service's labels).
pub const PROXIED_SLICES_SELECTOR: &str = "!service.kubernetes.io/headless,!service.kubernetes.io/service-proxy-name";
const LABEL_ZONE: &str = "topology.kubernetes.io/zone";
const ANNOTATION_TOPOLOGY_MODE: &str = "service.kubernetes.io/topology-mode";
const ANNOTATION_TOPOLOGY_HINTS: &str = "service.kubernetes.io/topology-aware-hints";
const ANNOTATION_TRIGGER_TIME: &str = "endpoints.kubernetes.io/last-change-trigger-time";
const DEFAULT_AFFINITY_TIMEOUT: u32 = 10800;
/// Lists nest at most this deep (a List of Lists is already unusual).
const MAX_LIST_DEPTH: usize = 4;

/// The text of a manifest could not be parsed at all. Objects that parse as JSON/YAML but not as
/// their kind are not errors: they are counted in [`Skips`] and the other objects still load.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("JSON document {document}: {source}")]
    Json {
        /// 0-based index of the JSON value in the text.
        document: usize,
        #[source]
        source: serde_json::Error,
    },
    #[error("YAML document {document}: {source}")]
    Yaml {
        /// 0-based index among the non-empty YAML documents.
        document: usize,
        #[source]
        source: serde_saphyr::Error,
    },
}

/// "namespace/name" of an object; the namespace defaults to "default" like kubectl's.
pub fn service_key(meta: &ObjectMeta) -> ServiceKey {
    ServiceKey::new(meta.namespace.as_deref().unwrap_or("default"), meta.name.as_deref().unwrap_or_default())
}

fn label<'a>(meta: &'a ObjectMeta, key: &str) -> Option<&'a str> {
    meta.labels.as_ref()?.get(key).map(String::as_str)
}

fn annotation<'a>(meta: &'a ObjectMeta, key: &str) -> Option<&'a str> {
    meta.annotations.as_ref()?.get(key).map(String::as_str)
}

fn protocol(p: Option<&str>) -> Option<Protocol> {
    match p.unwrap_or("TCP") {
        "TCP" => Some(Protocol::Tcp),
        "UDP" => Some(Protocol::Udp),
        "SCTP" => Some(Protocol::Sctp),
        _ => None,
    }
}

fn port_number(p: i32) -> Option<u16> {
    u16::try_from(p).ok().filter(|p| *p != 0)
}

/// The Service as kpx proxies it, or `None` when kpx does not proxy it (headless, ExternalName,
/// owned by another proxy, or with an invalid cluster IP, which is counted).
pub fn service(obj: &core::Service, skips: &Skips) -> Option<model::Service> {
    let key = service_key(&obj.metadata);
    if label(&obj.metadata, LABEL_SERVICE_PROXY_NAME).is_some() {
        tracing::debug!(service = %key, "not proxied: {LABEL_SERVICE_PROXY_NAME} is set");
        return None;
    }
    let spec = obj.spec.as_ref()?;
    let service_type = match spec.type_.as_deref().unwrap_or("ClusterIP") {
        "ClusterIP" => ServiceType::ClusterIp,
        "NodePort" => ServiceType::NodePort,
        "LoadBalancer" => ServiceType::LoadBalancer,
        "ExternalName" => return None,
        other => {
            skips.record(ObjectKind::Service, &key, SkipReason::Malformed, &format_args!("unknown type {other:?}"));
            return None;
        }
    };
    let cluster_ip_texts: Vec<&str> = match spec.cluster_ips.as_deref() {
        Some(ips) if !ips.is_empty() => ips.iter().map(String::as_str).collect(),
        _ => spec.cluster_ip.as_deref().into_iter().collect(),
    };
    match cluster_ip_texts.first() {
        None | Some(&"") | Some(&"None") => return None,
        Some(_) => {}
    }
    let mut cluster_ips = Vec::with_capacity(cluster_ip_texts.len());
    for text in cluster_ip_texts {
        match text.trim().parse::<IpAddr>() {
            Ok(ip) => cluster_ips.push(ip),
            Err(_) => {
                let detail = format_args!("cluster IP {text:?} is not an IP address");
                skips.record(ObjectKind::Service, &key, SkipReason::InvalidIp, &detail);
                return None;
            }
        }
    }

    let ports = service_ports(&key, spec.ports.as_deref().unwrap_or_default(), skips);
    let external_ips = ips(&key, "external IP", spec.external_ips.iter().flatten().map(String::as_str), skips);
    let (load_balancer_ips, load_balancer_source_ranges) = if service_type == ServiceType::LoadBalancer {
        // ipMode Proxy: the load balancer proxies to the nodes itself, the VIP must not be
        // captured on the nodes (kube-proxy skips those too).
        let ingress = obj
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_ref())
            .into_iter()
            .flatten()
            .filter(|i| i.ip_mode.as_deref() != Some("Proxy"))
            .filter_map(|i| i.ip.as_deref())
            .filter(|ip| !ip.is_empty());
        let lb_ips = ips(&key, "load balancer ingress IP", ingress, skips);
        let mut ranges = Vec::new();
        for text in spec.load_balancer_source_ranges.iter().flatten() {
            match text.parse::<Cidr>() {
                Ok(cidr) => ranges.push(cidr),
                Err(e) => skips.record(ObjectKind::Service, &key, SkipReason::InvalidCidr, &e),
            }
        }
        (lb_ips, ranges)
    } else {
        (Vec::new(), Vec::new())
    };

    let session_affinity_timeout = (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
        spec.session_affinity_config
            .as_ref()
            .and_then(|c| c.client_ip.as_ref())
            .and_then(|c| c.timeout_seconds)
            .and_then(|t| u32::try_from(t).ok())
            .filter(|t| *t > 0)
            .unwrap_or(DEFAULT_AFFINITY_TIMEOUT)
    });
    // externalTrafficPolicy only means something for traffic that comes from outside.
    let externally_reachable = service_type != ServiceType::ClusterIp || !external_ips.is_empty();
    let external_policy_local = externally_reachable && spec.external_traffic_policy.as_deref() == Some("Local");
    let internal_policy_local = spec.internal_traffic_policy.as_deref() == Some("Local");
    let health_check_node_port = spec.health_check_node_port.and_then(port_number).unwrap_or(0);
    let auto = |v: Option<&str>| matches!(v, Some("Auto" | "auto"));
    let topology_aware = spec.traffic_distribution.as_deref().is_some_and(|t| !t.is_empty())
        || auto(annotation(&obj.metadata, ANNOTATION_TOPOLOGY_MODE))
        || auto(annotation(&obj.metadata, ANNOTATION_TOPOLOGY_HINTS));

    Some(model::Service {
        key,
        service_type,
        cluster_ips,
        external_ips,
        load_balancer_ips,
        load_balancer_source_ranges,
        ports,
        session_affinity_timeout,
        external_policy_local,
        internal_policy_local,
        health_check_node_port,
        topology_aware,
    })
}

fn service_ports(key: &ServiceKey, ports: &[core::ServicePort], skips: &Skips) -> Vec<model::ServicePort> {
    let mut out: Vec<model::ServicePort> = Vec::with_capacity(ports.len());
    for p in ports {
        let name = p.name.clone().unwrap_or_default();
        let skip = |reason, detail: &dyn std::fmt::Display| skips.record(ObjectKind::Service, key, reason, detail);
        let Some(protocol) = protocol(p.protocol.as_deref()) else {
            skip(SkipReason::UnknownProtocol, &format_args!("port {name:?}: unknown protocol {:?}", p.protocol));
            continue;
        };
        let Some(port) = port_number(p.port) else {
            skip(SkipReason::PortOutOfRange, &format_args!("port {name:?}: port {} out of range", p.port));
            continue;
        };
        let node_port = match p.node_port.unwrap_or(0) {
            0 => 0,
            n => match port_number(n) {
                Some(n) => n,
                None => {
                    skip(SkipReason::PortOutOfRange, &format_args!("port {name:?}: nodePort {n} out of range"));
                    continue;
                }
            },
        };
        // Endpoint ports are matched to service ports by name, so a name must be unique.
        if out.iter().any(|o| o.name == name) {
            skip(SkipReason::DuplicatePort, &format_args!("port name {name:?} is used twice"));
            continue;
        }
        out.push(model::ServicePort { name, protocol, port, node_port });
    }
    out
}

fn ips<'a>(key: &ServiceKey, what: &str, texts: impl Iterator<Item = &'a str>, skips: &Skips) -> Vec<IpAddr> {
    let mut out = Vec::new();
    for text in texts {
        match text.trim().parse::<IpAddr>() {
            Ok(ip) if !out.contains(&ip) => out.push(ip),
            Ok(_) => {}
            Err(_) => {
                let detail = format_args!("{what} {text:?} is not an IP address");
                skips.record(ObjectKind::Service, key, SkipReason::InvalidIp, &detail);
            }
        }
    }
    out
}

/// The EndpointSlice as the model sees it, or `None` (counted) when it names no service or
/// holds FQDN addresses.
pub fn endpoint_slice(obj: &discovery::EndpointSlice, skips: &Skips) -> Option<model::EndpointSlice> {
    let key: SliceKey = service_key(&obj.metadata);
    let record = |reason, detail: &dyn std::fmt::Display| skips.record(ObjectKind::EndpointSlice, &key, reason, detail);
    if let Some(l) = [LABEL_HEADLESS, LABEL_SERVICE_PROXY_NAME].into_iter().find(|l| label(&obj.metadata, l).is_some())
    {
        // What the apiserver source does not even list (PROXIED_SLICES_SELECTOR): quietly ignored.
        tracing::debug!(slice = %key, "not proxied: {l} is set");
        return None;
    }
    let Some(service_name) = label(&obj.metadata, LABEL_SERVICE_NAME).filter(|n| !n.is_empty()) else {
        record(SkipReason::MissingServiceLabel, &format_args!("no {LABEL_SERVICE_NAME} label"));
        return None;
    };
    let family = match obj.address_type.as_str() {
        "IPv4" => IpFamily::V4,
        "IPv6" => IpFamily::V6,
        other => {
            record(SkipReason::UnsupportedAddressType, &format_args!("addressType {other:?}"));
            return None;
        }
    };

    let mut ports = Vec::new();
    for p in obj.ports.iter().flatten() {
        let name = p.name.clone().unwrap_or_default();
        let Some(port) = p.port.and_then(port_number) else {
            record(SkipReason::PortOutOfRange, &format_args!("port {name:?}: port {:?} out of range", p.port));
            continue;
        };
        let Some(protocol) = protocol(p.protocol.as_deref()) else {
            record(SkipReason::UnknownProtocol, &format_args!("port {name:?}: unknown protocol {:?}", p.protocol));
            continue;
        };
        ports.push(model::SlicePort { name, protocol, port });
    }

    let mut endpoints = Vec::with_capacity(obj.endpoints.len());
    for ep in &obj.endpoints {
        let Some(text) = ep.addresses.first() else {
            record(SkipReason::Malformed, &"an endpoint has no address");
            continue;
        };
        let ip = match text.parse::<IpAddr>() {
            Ok(ip) if IpFamily::of(&ip) == family => ip,
            _ => {
                let detail = format_args!("endpoint address {text:?} is not an {} address", obj.address_type);
                record(SkipReason::InvalidIp, &detail);
                continue;
            }
        };
        let conditions = ep.conditions.as_ref();
        let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
        let serving = conditions.and_then(|c| c.serving).unwrap_or(ready);
        let terminating = conditions.and_then(|c| c.terminating).unwrap_or(false);
        let hints = ep.hints.as_ref();
        endpoints.push(model::SliceEndpoint {
            ip,
            ready,
            serving,
            terminating,
            node_name: ep.node_name.clone(),
            zone: ep.zone.clone(),
            zone_hints: hints.and_then(|h| h.for_zones.as_ref()).map(|z| z.iter().map(|z| z.name.clone()).collect()),
            node_hints: hints.and_then(|h| h.for_nodes.as_ref()).map(|n| n.iter().map(|n| n.name.clone()).collect()),
        });
    }

    Some(model::EndpointSlice {
        service: ServiceKey::new(key.namespace.clone(), service_name),
        family,
        ports,
        endpoints,
        trigger_time: annotation(&obj.metadata, ANNOTATION_TRIGGER_TIME).map(str::to_owned),
        key,
    })
}

/// The Node's name, zone and InternalIP addresses.
pub fn node(obj: &core::Node) -> model::Node {
    let name = obj.metadata.name.clone().unwrap_or_default();
    let mut addresses = Vec::new();
    for a in obj.status.as_ref().and_then(|s| s.addresses.as_ref()).into_iter().flatten() {
        if a.type_ != "InternalIP" {
            continue;
        }
        match a.address.parse::<IpAddr>() {
            Ok(ip) if !addresses.contains(&ip) => addresses.push(ip),
            Ok(_) => {}
            Err(_) => tracing::debug!(node = %name, address = %a.address, "ignoring an InternalIP that is not an IP"),
        }
    }
    model::Node { zone: label(&obj.metadata, LABEL_ZONE).map(str::to_owned), name, addresses }
}

/// Parses a manifest file's text: JSON (one or more values), or YAML with one or more
/// documents; `kind: List` (and any `*List` with `items`) is expanded. Returns one event per
/// Service, EndpointSlice and Node: `Some` when it is proxied and valid, `None` when it exists
/// but is not proxied or is invalid. Other kinds are ignored. A document that does not
/// deserialize into its kind is counted as (Manifest, Malformed) and the others still load;
/// only text that is not JSON/YAML at all is an error.
pub fn events_from_manifest(text: &str, skips: &Skips) -> Result<Vec<ClusterEvent>, ManifestError> {
    let documents = parse_documents(text)?;
    let mut events = Vec::new();
    for (index, doc) in documents.into_iter().enumerate() {
        push_object(index, doc, 0, skips, &mut events);
    }
    Ok(events)
}

fn parse_documents(text: &str) -> Result<Vec<Value>, ManifestError> {
    let trimmed = text.trim_start();
    if trimmed.starts_with('{') || trimmed.starts_with('[') {
        let mut docs = Vec::new();
        for (document, value) in serde_json::Deserializer::from_str(text).into_iter::<Value>().enumerate() {
            docs.push(value.map_err(|source| ManifestError::Json { document, source })?);
        }
        return Ok(docs);
    }
    let mut bytes = text.as_bytes();
    let mut docs = Vec::new();
    for (document, value) in serde_saphyr::read::<_, Value>(&mut bytes).enumerate() {
        docs.push(value.map_err(|source| ManifestError::Yaml { document, source })?);
    }
    Ok(docs)
}

fn push_object(index: usize, doc: Value, depth: usize, skips: &Skips, events: &mut Vec<ClusterEvent>) {
    let malformed = |what: &dyn std::fmt::Display, detail: &dyn std::fmt::Display| {
        skips.record(ObjectKind::Manifest, &format_args!("document {index} ({what})"), SkipReason::Malformed, detail)
    };
    let kind = match &doc {
        Value::Null => return,
        Value::Array(_) => "List".to_owned(),
        Value::Object(map) => match map.get("kind") {
            Some(Value::String(kind)) => kind.clone(),
            _ => return malformed(&"object", &"no kind"),
        },
        other => return malformed(&"value", &format_args!("not an object: {other}")),
    };
    let name = || {
        let meta = doc.get("metadata");
        let field = |f| meta.and_then(|m| m.get(f)).and_then(Value::as_str).unwrap_or("");
        match field("namespace") {
            "" => format!("{kind} {}", field("name")),
            ns => format!("{kind} {ns}/{}", field("name")),
        }
    };
    match kind.as_str() {
        "Service" => match core::Service::deserialize(&doc) {
            Ok(obj) => events.push(match service(&obj, skips) {
                Some(s) => ClusterEvent::Service(service_key(&obj.metadata), Some(s)),
                None => ClusterEvent::NotProxied(service_key(&obj.metadata)),
            }),
            Err(e) => malformed(&name(), &e),
        },
        "EndpointSlice" => match discovery::EndpointSlice::deserialize(&doc) {
            Ok(obj) => events.push(ClusterEvent::Slice(service_key(&obj.metadata), endpoint_slice(&obj, skips))),
            Err(e) => malformed(&name(), &e),
        },
        "Node" => match core::Node::deserialize(&doc) {
            Ok(obj) => {
                let node = node(&obj);
                events.push(ClusterEvent::Node(node.name.clone(), Some(node)));
            }
            Err(e) => malformed(&name(), &e),
        },
        k if k.ends_with("List") => {
            if depth >= MAX_LIST_DEPTH {
                return malformed(&kind, &"lists nested too deep");
            }
            let items = match doc {
                Value::Array(items) => items,
                mut object => match object.get_mut("items").map(Value::take) {
                    Some(Value::Array(items)) => items,
                    Some(Value::Null) | None => Vec::new(),
                    Some(_) => return malformed(&kind, &"items is not a list"),
                },
            };
            for item in items {
                push_object(index, item, depth + 1, skips, events);
            }
        }
        _ => tracing::debug!(document = index, kind = %kind, "ignoring a kind kpx does not use"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn svc(spec: Value, annotations: Value) -> core::Service {
        serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "s", "namespace": "ns", "annotations": annotations},
            "spec": spec,
            "status": {"loadBalancer": {"ingress": [{"ip": "203.0.113.1"}]}},
        }))
        .unwrap()
    }

    #[test]
    fn external_policy_only_counts_for_externally_reachable_services() {
        let skips = Skips::default();
        let spec = |ty: &str, ext: Value| {
            json!({"type": ty, "clusterIP": "10.0.0.1", "externalTrafficPolicy": "Local", "externalIPs": ext,
                   "internalTrafficPolicy": "Local", "healthCheckNodePort": 31000})
        };
        let plain = service(&svc(spec("ClusterIP", json!([])), json!({})), &skips).unwrap();
        assert!(!plain.external_policy_local && plain.internal_policy_local);
        assert!(plain.load_balancer_ips.is_empty(), "ingress status only counts for LoadBalancer");
        let with_ext = service(&svc(spec("ClusterIP", json!(["192.0.2.1"])), json!({})), &skips).unwrap();
        assert!(with_ext.external_policy_local);
        let lb = service(&svc(spec("LoadBalancer", json!([])), json!({})), &skips).unwrap();
        assert!(lb.external_policy_local);
        assert_eq!(lb.load_balancer_ips, ["203.0.113.1".parse::<IpAddr>().unwrap()]);
        assert_eq!(lb.health_check_node_port, 31000);
        assert_eq!(skips.total(), 0);
    }

    #[test]
    fn topology_is_asked_by_traffic_distribution_or_annotations() {
        let skips = Skips::default();
        let aware = |spec: Value, ann: Value| service(&svc(spec, ann), &skips).unwrap().topology_aware;
        let ip = json!({"clusterIP": "10.0.0.1"});
        assert!(!aware(ip.clone(), json!({})));
        assert!(aware(json!({"clusterIP": "10.0.0.1", "trafficDistribution": "PreferClose"}), json!({})));
        assert!(aware(ip.clone(), json!({ANNOTATION_TOPOLOGY_HINTS: "auto"})));
        assert!(aware(ip.clone(), json!({ANNOTATION_TOPOLOGY_MODE: "Auto"})));
        assert!(!aware(ip, json!({ANNOTATION_TOPOLOGY_MODE: "Disabled"})));
    }

    #[test]
    fn slices_of_headless_and_other_proxies_services_are_ignored_quietly() {
        let skips = Skips::default();
        let slice = |labels: Value| -> discovery::EndpointSlice {
            serde_json::from_value(json!({
                "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
                "metadata": {"name": "s-1", "namespace": "ns", "labels": labels},
                "endpoints": [{"addresses": ["10.0.0.1"]}],
            }))
            .unwrap()
        };
        let headless = json!({LABEL_SERVICE_NAME: "s", LABEL_HEADLESS: ""});
        let other = json!({LABEL_SERVICE_NAME: "s", LABEL_SERVICE_PROXY_NAME: "other"});
        assert!(endpoint_slice(&slice(headless), &skips).is_none());
        assert!(endpoint_slice(&slice(other), &skips).is_none());
        assert!(endpoint_slice(&slice(json!({LABEL_SERVICE_NAME: "s"})), &skips).is_some());
        assert_eq!(skips.total(), 0);
        // The watcher's selector says the same to the apiserver.
        assert_eq!(PROXIED_SLICES_SELECTOR, format!("!{LABEL_HEADLESS},!{LABEL_SERVICE_PROXY_NAME}"));
    }

    #[test]
    fn duplicate_port_names_keep_the_first() {
        let skips = Skips::default();
        let spec = json!({"clusterIP": "10.0.0.1", "ports": [
            {"name": "a", "port": 80}, {"name": "a", "port": 81, "protocol": "UDP"}, {"name": "b", "port": 82}]});
        let s = service(&svc(spec, json!({})), &skips).unwrap();
        assert_eq!(s.ports.iter().map(|p| p.port).collect::<Vec<_>>(), [80, 82]);
        assert_eq!(skips.count(ObjectKind::Service, SkipReason::DuplicatePort), 1);
    }

    #[test]
    fn endpoint_conditions_hints_and_families() {
        let skips = Skips::default();
        let slice: discovery::EndpointSlice = serde_json::from_value(json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
            "metadata": {"name": "s-1", "namespace": "ns", "labels": {LABEL_SERVICE_NAME: "s"}},
            "ports": [{"name": "p", "port": 8080, "protocol": "SCTP"}, {"port": 9, "protocol": "GRE"}],
            "endpoints": [
                {"addresses": ["10.0.0.1"], "nodeName": "n1", "zone": "z1",
                 "hints": {"forZones": [{"name": "z1"}], "forNodes": [{"name": "n1"}]}},
                {"addresses": ["10.0.0.2"], "conditions": {"ready": false}},
                {"addresses": ["10.0.0.3"], "conditions": {"ready": false, "serving": true, "terminating": true}},
                {"addresses": ["fd00::1"]},
            ],
        }))
        .unwrap();
        let s = endpoint_slice(&slice, &skips).unwrap();
        assert_eq!(s.service, ServiceKey::new("ns", "s"));
        assert_eq!(s.ports, [model::SlicePort { name: "p".into(), protocol: Protocol::Sctp, port: 8080 }]);
        assert_eq!(skips.count(ObjectKind::EndpointSlice, SkipReason::UnknownProtocol), 1);
        assert_eq!(skips.count(ObjectKind::EndpointSlice, SkipReason::InvalidIp), 1, "IPv6 in an IPv4 slice");
        let e = &s.endpoints;
        assert_eq!(e.len(), 3);
        assert!(e[0].ready && e[0].serving && !e[0].terminating);
        assert_eq!(e[0].zone_hints.as_deref(), Some(&["z1".to_string()][..]));
        assert_eq!(e[0].node_hints.as_deref(), Some(&["n1".to_string()][..]));
        assert!(!e[1].ready && !e[1].serving, "serving defaults to ready");
        assert_eq!((e[1].zone_hints.as_ref(), e[1].node_name.as_ref()), (None, None));
        assert!(!e[2].ready && e[2].serving && e[2].terminating);
    }
}
