//! Command-line flags of kpxctl. Usage errors are clap's (exit code 2).

use crate::explain::{Cidr, Target};
use crate::output::Format;
use clap::{Parser, Subcommand};
use std::fmt;
use std::net::IpAddr;

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

    #[command(flatten)]
    pub tls: kpx_auth::flags::ClientFlags,

    /// Use this kubeconfig's current user (client certificate or token) to authenticate; the
    /// flags above take precedence. Its cluster CA is the apiserver's: kpx's is --cacert.
    #[arg(long, value_name = "PATH", global = true)]
    pub kubeconfig: Option<std::path::PathBuf>,

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
    /// Stream a node's state: the snapshot, then one line per change, until Ctrl-C.
    Watch {
        /// The node's name, as in its Node object.
        node: String,
    },
    /// Compare a node's desired state (controlplane) with what its dataplane applied, per service
    /// and endpoint, and check the kernel has the applied services' chains.
    Diff {
        /// The node's name, as in its Node object.
        node: String,
        /// The node's dataplane admin API (its --admin-listen). The default is the dataplane's
        /// own default, which answers when kpxctl runs on the node.
        #[arg(long, env = "KPX_DATAPLANE", value_name = "ADDR", default_value = "127.0.0.1:10266")]
        dataplane: String,
    },
    /// Make a CA and certificates for a development or demo cluster (production: cert-manager
    /// or the cluster CA; see deploy/).
    Certs(crate::certs::CertsArgs),
    /// Explain where a packet to DST:PORT/PROTO goes on a node, and why.
    Explain {
        /// The node's name, as in its Node object.
        node: String,
        /// DST:PORT/PROTO, for example 10.96.0.10:80/tcp or [fd00::10]:53/udp.
        destination: Target,
        /// The packet's source address (decides masquerade, source ranges, hairpin).
        #[arg(long = "from", value_name = "SRC")]
        from: Option<IpAddr>,
        /// An address of the node that accepts NodePorts (repeat for several; as the dataplane's
        /// --node-ip). Without it, a node port matches on any destination.
        #[arg(long = "node-ip", value_name = "IP")]
        node_ips: Vec<IpAddr>,
        /// The pod CIDR the dataplane runs with (its --cluster-cidr; repeat for dual-stack).
        #[arg(long = "cluster-cidr", value_name = "CIDR")]
        cluster_cidrs: Vec<Cidr>,
        /// The dataplane runs with --masquerade-all.
        #[arg(long)]
        masquerade_all: bool,
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
    fn watch_and_explain() {
        let cli = parse(&["watch", "node-a", "-o", "json"]).unwrap();
        assert!(matches!(cli.command, Command::Watch { node } if node == "node-a"));
        let cli = parse(&[
            "explain",
            "node-b",
            "[fd00::10]:53/UDP",
            "--from",
            "fd00::1",
            "--node-ip",
            "10.77.0.11",
            "--cluster-cidr",
            "10.244.0.0/16",
        ])
        .unwrap();
        let Command::Explain { node, destination, from, node_ips, cluster_cidrs, masquerade_all } = cli.command else {
            panic!("not explain")
        };
        assert_eq!(node, "node-b");
        assert_eq!(destination.to_string(), "[fd00::10]:53/UDP");
        assert_eq!(from, Some("fd00::1".parse().unwrap()));
        assert_eq!(node_ips, ["10.77.0.11".parse::<IpAddr>().unwrap()]);
        assert_eq!(cluster_cidrs[0].to_string(), "10.244.0.0/16");
        assert!(!masquerade_all);
        for bad in ["10.96.0.10:80", "10.96.0.10/tcp", "fd00::1:80/tcp", "10.96.0.10:80/icmp", "10.96.0.10:0/tcp"] {
            let err = parse(&["explain", "n", bad]).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::ValueValidation, "{bad}");
        }
        assert!(parse(&["explain", "n", "10.96.0.10:80/tcp", "--cluster-cidr", "10.0.0.0/33"]).is_err());
    }

    #[test]
    fn diff_asks_the_dataplane_on_this_node_by_default() {
        let cli = parse(&["diff", "node-a", "--dataplane", "10.0.0.5:9000", "-o", "yaml"]).unwrap();
        assert!(
            matches!(cli.command, Command::Diff { node, dataplane } if node == "node-a" && dataplane == "10.0.0.5:9000")
        );
        if std::env::var_os("KPX_DATAPLANE").is_none() {
            // The dataplane's default --admin-listen: kpxctl run on the node finds it.
            let cli = parse(&["diff", "node-a"]).unwrap();
            assert!(matches!(cli.command, Command::Diff { dataplane, .. } if dataplane == "127.0.0.1:10266"));
        }
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
