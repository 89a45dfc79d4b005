//! Command-line flags of kpxctl. Usage errors are clap's (exit code 2).

use crate::output::Format;
use clap::{Parser, Subcommand};
use std::fmt;

pub const DEFAULT_CONTROLPLANE: &str = "http://127.0.0.1:10900";

#[derive(Debug, Parser)]
#[command(name = "kpxctl", version, about = "Inspect kpx: nodes, their desired proxy state, and services")]
pub struct Cli {
    /// gRPC address of kpx-controlplane.
    #[arg(long, env = "KPX_CONTROLPLANE", default_value = DEFAULT_CONTROLPLANE, global = true)]
    pub controlplane: String,

    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Format::Table, global = true)]
    pub output: Format,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// List the nodes the controlplane knows: connection, versions, last apply, last error.
    Nodes,
    /// Show the desired proxy state of a node, one row per service port.
    State {
        /// The node's name, as in its Node object.
        node: String,
    },
    /// Show one service and the endpoints each group of nodes sees for it.
    Service {
        /// NAMESPACE/NAME
        #[arg(value_parser = parse_service_name)]
        service: ServiceName,
    },
}

/// A `namespace/name` service reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceName {
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

fn parse_service_name(s: &str) -> Result<ServiceName, String> {
    match s.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
            Ok(ServiceName { namespace: ns.to_string(), name: name.to_string() })
        }
        _ => Err(format!("expected NAMESPACE/NAME, got {s:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::error::ErrorKind;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("kpxctl").chain(args.iter().copied()))
    }

    #[test]
    fn defaults_and_global_flags() {
        let cli = parse(&["nodes"]).unwrap();
        assert!(matches!(cli.command, Command::Nodes));
        assert_eq!(cli.output, Format::Table);

        let cli = parse(&["--controlplane", "http://cp:1", "state", "node-a", "-o", "yaml"]).unwrap();
        assert_eq!(cli.controlplane, "http://cp:1");
        assert_eq!(cli.output, Format::Yaml);
        assert!(matches!(cli.command, Command::State { node } if node == "node-a"));

        let cli = parse(&["service", "-o", "json", "demo/web"]).unwrap();
        assert_eq!(cli.output, Format::Json);
        let Command::Service { service } = cli.command else { panic!("not a service command") };
        assert_eq!(service, ServiceName { namespace: "demo".into(), name: "web".into() });
        assert_eq!(service.to_string(), "demo/web");
    }

    #[test]
    fn usage_errors() {
        for bad in ["web", "demo/", "/web", "a/b/c"] {
            let err = parse(&["service", bad]).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::ValueValidation, "{bad}");
            assert_eq!(err.exit_code(), 2);
        }
        assert_eq!(parse(&["state"]).unwrap_err().kind(), ErrorKind::MissingRequiredArgument);
        assert_eq!(parse(&["nodes", "-o", "xml"]).unwrap_err().kind(), ErrorKind::InvalidValue);
        assert_eq!(parse(&[]).unwrap_err().exit_code(), 2);
    }

    #[test]
    fn clap_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
