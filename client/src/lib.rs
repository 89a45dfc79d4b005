//! kpxctl, the kpx inspection CLI: it asks the controlplane's `kpx.v1.Inspect` service about
//! nodes, a node's desired proxy state, or one service across nodes, and prints the answer as
//! a kubectl-like table, JSON or YAML.
//!
//! Data flow: `cli` (flags) -> `connect` (gRPC channel, errors people can act on) -> one RPC
//! -> `output` (format choice) -> `render` (pure: response -> text, built on `table`).

pub mod certs;
pub mod cli;
pub mod connect;
pub mod credentials;
pub mod diff;
pub mod explain;
pub mod output;
pub mod render;
pub mod table;
pub mod watch;

use cli::{Cli, Command};
pub use connect::ClientError;
use kpx_proto::v1::{GetNodeStateRequest, GetServiceRequest, ListNodesRequest};
use output::Format;
use std::io::{IsTerminal, Write};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Runs the command `cli` describes and returns what to print (`watch` prints as it goes and
/// returns nothing).
pub async fn run(cli: Cli) -> Result<String, ClientError> {
    if let Command::Certs(args) = &cli.command {
        return certs::run(args);
    }
    let target = connect::normalize_address(&cli.controlplane)?;
    let creds = credentials::resolve(&cli.tls, cli.kubeconfig.as_deref())?;
    if let Command::Watch { node } = &cli.command {
        return watch_node(&target, &creds, node, cli.output).await.map(|()| String::new());
    }
    if let Command::Diff { node, dataplane } = &cli.command {
        let diff = diff::fetch(&target, dataplane, node, &creds).await?;
        return match cli.output {
            Format::Table => Ok(diff::render(&diff)),
            format => output::encode(&diff, format),
        };
    }
    let mut client = connect::connect(&target, &creds, connect::CONNECT_TIMEOUT).await?;
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
        Command::Explain { node, destination, from, node_ips, cluster_cidrs, masquerade_all } => {
            let req = GetNodeStateRequest { node_name: node.clone() };
            let state = client
                .get_node_state(req)
                .await
                .map_err(|s| connect::status_error(&target, "GetNodeState", Some(format!("node {node:?}")), s))?
                .into_inner();
            let query = explain::Query { dst: destination, src: from, node_ips, cluster_cidrs, masquerade_all };
            output::explain(&explain::explain(&state, &query), cli.output)
        }
        Command::Watch { .. } | Command::Diff { .. } | Command::Certs(_) => unreachable!("handled above"),
    }
}

/// How long connecting may take before "waiting for the controlplane..." is shown.
const PROGRESS_AFTER: Duration = Duration::from_millis(300);

/// Streams WatchNodeState to stdout until the stream ends or Ctrl-C.
async fn watch_node(
    target: &str,
    creds: &kpx_auth::client::ClientCredentials,
    node: &str,
    format: Format,
) -> Result<(), ClientError> {
    let progress = Progress::new(format!("waiting for the controlplane at {target}..."));
    let rpc_error = |s| connect::status_error(target, "WatchNodeState", Some(format!("node {node:?}")), s);
    let opened = async {
        let mut client = connect::connect(target, creds, connect::CONNECT_TIMEOUT).await?;
        let req = GetNodeStateRequest { node_name: node.to_string() };
        client.watch_node_state(req).await.map_err(rpc_error).map(tonic::Response::into_inner)
    };
    tokio::pin!(opened);
    let mut stream = tokio::select! {
        s = &mut opened => s?,
        _ = tokio::time::sleep(PROGRESS_AFTER) => {
            progress.show();
            tokio::select! {
                s = &mut opened => s?,
                _ = tokio::signal::ctrl_c() => return Ok(()),
            }
        }
    };
    let mut state = watch::LocalState::default();
    let mut chunks = watch::Chunks::default();
    let mut stdout = std::io::stdout();
    loop {
        let msg = tokio::select! {
            m = stream.message() => m.map_err(rpc_error)?,
            _ = tokio::signal::ctrl_c() => return Ok(()),
        };
        let Some(chunk) = msg else {
            progress.done();
            eprintln!("the controlplane ended the stream");
            return Ok(());
        };
        let Some(update) = chunks.push(chunk) else { continue };
        progress.done();
        let change = state.apply(&update).map_err(|message| ClientError::Stream { message })?;
        let text = match format {
            Format::Table if change.full => watch::snapshot_text(node, &state, now_unix_ms()),
            Format::Table => watch::change_line(&change, now_unix_ms()),
            _ => output::update(&update, format)?,
        };
        // A closed stdout (`| head`) ends the watch.
        if stdout.write_all(text.as_bytes()).and_then(|()| stdout.flush()).is_err() {
            return Ok(());
        }
    }
}

/// A progress line on stderr, erased once done when stderr is a terminal.
struct Progress {
    text: String,
    shown: std::cell::Cell<bool>,
}

impl Progress {
    fn new(text: String) -> Self {
        Progress { text, shown: std::cell::Cell::new(false) }
    }

    fn show(&self) {
        self.shown.set(true);
        eprint!("{}", self.text);
        if !std::io::stderr().is_terminal() {
            eprintln!();
        }
    }

    fn done(&self) {
        if self.shown.replace(false) && std::io::stderr().is_terminal() {
            eprint!("\r\x1b[K");
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.done();
    }
}

fn now_unix_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}
