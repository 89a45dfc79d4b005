//! The output format: a table for people, or JSON/YAML of the response for scripts.
//!
//! JSON and YAML show the wire messages field by field, with enums by their proto names
//! ("NODE_PORT", "TCP", as grpcurl prints them) instead of prost's integers.

use crate::ClientError;
use crate::explain::Explanation;
use crate::render;
use kpx_proto::v1::{ListNodesResponse, NodeState, Protocol, ServiceAcrossNodes, ServiceType, Update};
use serde::Serialize;
use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Json,
    Yaml,
}

pub fn nodes(resp: &ListNodesResponse, format: Format, now_unix_ms: i64) -> Result<String, ClientError> {
    match format {
        Format::Table => Ok(render::nodes_table(resp, now_unix_ms)),
        _ => encode(resp, format),
    }
}

pub fn state(resp: &NodeState, format: Format) -> Result<String, ClientError> {
    match format {
        Format::Table => Ok(render::state_table(resp)),
        _ => encode(resp, format),
    }
}

pub fn service(resp: &ServiceAcrossNodes, format: Format) -> Result<String, ClientError> {
    match format {
        Format::Table => Ok(render::service_view(resp)),
        _ => encode(resp, format),
    }
}

pub fn explain(ex: &Explanation, format: Format) -> Result<String, ClientError> {
    match format {
        Format::Table => Ok(render::explain_view(ex)),
        _ => encode(ex, format),
    }
}

/// One streamed update for `watch -o json|yaml`: a JSON object on one line, or a YAML
/// document starting with `---`.
pub fn update(u: &Update, format: Format) -> Result<String, ClientError> {
    match format {
        Format::Yaml => Ok(format!("---\n{}", encode(u, Format::Yaml)?)),
        _ => {
            let err = |e: serde_json::Error| ClientError::Encode { format: "json", reason: e.to_string() };
            let mut value = serde_json::to_value(u).map_err(err)?;
            name_enums(&mut value);
            Ok(serde_json::to_string(&value).map_err(err)? + "\n")
        }
    }
}

/// Encodes a response as JSON or YAML (a table falls back to JSON), ending with a newline.
pub fn encode<T: Serialize>(resp: &T, format: Format) -> Result<String, ClientError> {
    let name = if format == Format::Yaml { "yaml" } else { "json" };
    let err = |reason: String| ClientError::Encode { format: name, reason };
    let mut value = serde_json::to_value(resp).map_err(|e| err(e.to_string()))?;
    name_enums(&mut value);
    let mut out = match format {
        Format::Yaml => serde_saphyr::to_string(&value).map_err(|e| err(e.to_string()))?,
        _ => serde_json::to_string_pretty(&value).map_err(|e| err(e.to_string()))?,
    };
    if !out.ends_with('\n') {
        out.push('\n');
    }
    Ok(out)
}

/// Replaces the integer values of the enum fields of kpx.v1 (`Service.type`,
/// `ServicePort.protocol`) by their names. No other kpx.v1 field has these names.
fn name_enums(value: &mut Value) {
    match value {
        Value::Object(map) => {
            for (key, child) in map.iter_mut() {
                let n = child.as_i64().and_then(|n| i32::try_from(n).ok());
                let name = match (key.as_str(), n) {
                    ("type", Some(n)) => ServiceType::try_from(n).ok().map(|t| t.as_str_name()),
                    ("protocol", Some(n)) => Protocol::try_from(n).ok().map(|p| p.as_str_name()),
                    _ => None,
                };
                match name {
                    Some(name) => *child = Value::String(name.to_string()),
                    None => name_enums(child),
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(name_enums),
        _ => {}
    }
}
