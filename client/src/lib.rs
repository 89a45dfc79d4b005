//! kpxctl, the kpx inspection CLI: it asks the controlplane's `kpx.v1.Inspect` service about
//! nodes, a node's desired proxy state, or one service across nodes, and prints the answer as
//! a kubectl-like table, JSON or YAML.
//!
//! Data flow: `cli` (flags) -> `connect` (gRPC channel, errors people can act on) -> one RPC
//! -> `output` (format choice) -> `render` (pure: response -> text, built on `table`).

pub mod cli;
pub mod connect;
pub mod output;
pub mod render;
pub mod table;

use cli::{Cli, Command};
pub use connect::ClientError;
use kpx_proto::v1::{GetNodeStateRequest, GetServiceRequest, ListNodesRequest};
use std::time::{SystemTime, UNIX_EPOCH};

/// Runs the command `cli` describes and returns what to print.
pub async fn run(cli: Cli) -> Result<String, ClientError> {
    let target = connect::normalize_address(&cli.controlplane)?;
    let mut client = connect::connect(&target, connect::CONNECT_TIMEOUT).await?;
    match cli.command {
        Command::Nodes => {
            let resp = client
                .list_nodes(ListNodesRequest {})
                .await
                .map_err(|s| connect::status_error(&target, "ListNodes", None, s))?
                .into_inner();
            output::nodes(&resp, cli.output, now_unix_ms())
        }
        Command::State { node } => {
            let req = GetNodeStateRequest { node_name: node.clone() };
            let resp = client
                .get_node_state(req)
                .await
                .map_err(|s| connect::status_error(&target, "GetNodeState", Some(format!("node {node:?}")), s))?
                .into_inner();
            output::state(&resp, cli.output)
        }
        Command::Service { service } => {
            let req = GetServiceRequest { namespace: service.namespace.clone(), name: service.name.clone() };
            let resp = client
                .get_service(req)
                .await
                .map_err(|s| connect::status_error(&target, "GetService", Some(format!("service \"{service}\"")), s))?
                .into_inner();
            output::service(&resp, cli.output)
        }
    }
}

fn now_unix_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}
