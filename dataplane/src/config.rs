//! `kpx-dataplane --config FILE`: kube-proxy's own configuration file (the KubeProxyConfiguration
//! of the kube-proxy ConfigMap, `kubeproxy.config.k8s.io/v1alpha1`), read into [`Settings`]: what
//! kpx applies, each field checked, and what it reports as meaning nothing to kpx. Flags given on
//! the command line override the file, as with kube-proxy (`main.rs` merges).
//!
//! Unknown fields and invalid values are an error naming the field (`iptables.syncPeriod:
//! "3x" is not a duration ...`): a typo must not quietly fall back to a default.

mod file;
#[cfg(test)]
mod tests;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use file::KubeProxyConfiguration;
use kpx_telemetry::flags::parse_go_duration;

pub const API_VERSION: &str = "kubeproxy.config.k8s.io/v1alpha1";
pub const KIND: &str = "KubeProxyConfiguration";

/// A field that is wrong, and why.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ConfigError {
    /// The field's path, `iptables.syncPeriod`; `.` for the document itself.
    pub field: String,
    pub message: String,
}

fn error(field: &str, message: impl Into<String>) -> ConfigError {
    ConfigError { field: field.to_string(), message: message.into() }
}

/// Which backend the file's `mode` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Iptables,
    Ipvs,
    Nftables,
}

/// The conntrack settings kube-proxy applies at startup (`conntrack.*`); None: leave the kernel's.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Conntrack {
    pub max_per_core: Option<u32>,
    pub min: Option<u32>,
    pub tcp_established_timeout: Option<Duration>,
    pub tcp_close_wait_timeout: Option<Duration>,
    pub tcp_be_liberal: Option<bool>,
    pub udp_timeout: Option<Duration>,
    pub udp_stream_timeout: Option<Duration>,
}

/// What the file sets, checked; None (or empty) where it sets nothing.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Settings {
    pub mode: Option<Mode>,
    pub node_name: Option<String>,
    /// Comma separated for dual-stack, as `--cluster-cidr`.
    pub cluster_cidr: Option<String>,
    /// CIDRs: node ports answer on the node's addresses inside them.
    pub node_port_addresses: Option<Vec<String>>,
    pub healthz_bind_address: Option<SocketAddr>,
    pub metrics_bind_address: Option<SocketAddr>,
    pub masquerade_all: Option<bool>,
    pub localhost_node_ports: Option<bool>,
    /// iptables.syncPeriod, or ipvs.syncPeriod in ipvs mode.
    pub sync_period: Option<Duration>,
    pub ipvs_scheduler: Option<String>,
    pub ipvs_strict_arp: Option<bool>,
    pub ipvs_tcp_timeout: Option<Duration>,
    pub ipvs_tcp_fin_timeout: Option<Duration>,
    pub ipvs_udp_timeout: Option<Duration>,
    pub ipvs_exclude_cidrs: Option<Vec<String>>,
    pub conntrack: Conntrack,
    /// logging.format: "text" or "json".
    pub log_format: Option<String>,
    /// Fields that are set but mean nothing to kpx, with why ("clientConnection: kpx reads the
    /// cluster through the controlplane").
    pub not_applicable: Vec<String>,
}

/// Reads a KubeProxyConfiguration (YAML or JSON).
pub fn parse(text: &str) -> Result<Settings, ConfigError> {
    let mut bytes = text.as_bytes();
    let mut docs = serde_saphyr::read::<_, serde_json::Value>(&mut bytes);
    let value = match docs.next() {
        Some(Ok(v)) => v,
        Some(Err(e)) => return Err(error(".", format!("not YAML or JSON: {e}"))),
        None => return Err(error(".", "empty file")),
    };
    if docs.next().is_some() {
        return Err(error(".", "more than one document; a KubeProxyConfiguration is one"));
    }
    if !value.is_object() {
        return Err(error(".", "not a KubeProxyConfiguration object"));
    }
    let file: KubeProxyConfiguration = serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        error(if path.is_empty() { "." } else { &path }, e.into_inner().to_string())
    })?;
    settings(file)
}

fn settings(f: KubeProxyConfiguration) -> Result<Settings, ConfigError> {
    match f.api_version.as_deref() {
        Some(API_VERSION) => {}
        other => return Err(error("apiVersion", format!("{other:?}: kpx reads {API_VERSION}"))),
    }
    match f.kind.as_deref() {
        Some(KIND) => {}
        other => return Err(error("kind", format!("{other:?}: expected {KIND}"))),
    }
    let mut s = Settings::default();
    let mut notes = Vec::new();
    let mut na = |field: &str, set: bool, why: &str| {
        if set {
            notes.push(format!("{field}: {why}"));
        }
    };
    na("bindAddress", nonempty(&f.bind_address), "kpx takes node addresses from --node-ip/nodePortAddresses");
    na(
        "bindAddressHardFail",
        f.bind_address_hard_fail == Some(true),
        "kpx always fails on a taken health or metrics port",
    );
    na("enableProfiling", f.enable_profiling == Some(true), "kpx serves no profiling endpoint");
    na("showHiddenMetricsForVersion", nonempty(&f.show_hidden_metrics_for_version), "kpx hides no metrics");
    na(
        "clientConnection",
        f.client_connection.is_some(),
        "kpx reads the cluster through the controlplane, not the apiserver",
    );
    na("configSyncPeriod", nonzero(&f.config_sync_period), "the controlplane streams changes as they happen");
    na("portRange", nonempty(&f.port_range), "the userspace proxy's; gone from kube-proxy too");
    na("udpIdleTimeout", nonempty(&f.udp_idle_timeout), "the userspace proxy's; gone from kube-proxy too");
    na("oomScoreAdj", f.oom_score_adj.is_some(), "set it in the dataplane's Pod spec");
    na("winkernel", f.winkernel.is_some(), "Windows only");
    na(
        "featureGates",
        f.feature_gates.as_ref().is_some_and(|g| !g.is_empty()),
        "kpx has no kube-proxy feature gates (its behaviour is 1.28's with the GA gates on)",
    );
    na(
        "nftables",
        f.nftables.is_some(),
        "kpx's nftables backend takes masqueradeAll and syncPeriod from the top level",
    );
    s.mode = match f.mode.as_deref().unwrap_or("") {
        "" | "iptables" => Some(Mode::Iptables),
        "ipvs" => Some(Mode::Ipvs),
        "nftables" => Some(Mode::Nftables),
        "kernelspace" => return Err(error("mode", "\"kernelspace\" is Windows only")),
        other => return Err(error("mode", format!("{other:?} is not iptables, ipvs or nftables"))),
    };
    s.node_name = f.hostname_override.filter(|h| !h.trim().is_empty()).map(|h| h.trim().to_lowercase());
    if let Some(cidrs) = f.cluster_cidr.filter(|c| !c.is_empty()) {
        for c in cidrs.split(',') {
            cidr(c.trim()).map_err(|m| error("clusterCIDR", m))?;
        }
        s.cluster_cidr = Some(cidrs);
    }
    match f.detect_local_mode.as_deref().unwrap_or("") {
        "" | "ClusterCIDR" => {}
        other @ ("NodeCIDR" | "BridgeInterface" | "InterfaceNamePrefix") => {
            return Err(error(
                "detectLocalMode",
                format!("{other:?} is not supported by kpx; use ClusterCIDR with clusterCIDR"),
            ));
        }
        other => {
            return Err(error(
                "detectLocalMode",
                format!("{other:?} is not ClusterCIDR, NodeCIDR, BridgeInterface or InterfaceNamePrefix"),
            ));
        }
    }
    if let Some(d) = &f.detect_local {
        na(
            "detectLocal",
            nonempty(&d.bridge_interface) || nonempty(&d.interface_name_prefix),
            "used only with detectLocalMode BridgeInterface or InterfaceNamePrefix",
        );
    }
    if let Some(list) = f.node_port_addresses.filter(|l| !l.is_empty()) {
        for (i, c) in list.iter().enumerate() {
            cidr(c).map_err(|m| error(&format!("nodePortAddresses[{i}]"), m))?;
        }
        s.node_port_addresses = Some(list);
    }
    s.healthz_bind_address = bind_address("healthzBindAddress", f.healthz_bind_address.as_deref(), 10256)?;
    s.metrics_bind_address = bind_address("metricsBindAddress", f.metrics_bind_address.as_deref(), 10249)?;
    let ipvs_mode = s.mode == Some(Mode::Ipvs);
    if let Some(ipt) = f.iptables {
        if let Some(bit) = ipt.masquerade_bit {
            if !(0..=31).contains(&bit) {
                return Err(error("iptables.masqueradeBit", format!("{bit} is not a bit number (0-31)")));
            }
            if bit != 14 {
                return Err(error(
                    "iptables.masqueradeBit",
                    format!("{bit}: kpx marks with bit 14 (0x4000), kube-proxy's default"),
                ));
            }
        }
        s.masquerade_all = ipt.masquerade_all;
        s.localhost_node_ports = ipt.localhost_node_ports;
        if !ipvs_mode {
            s.sync_period = go_duration("iptables.syncPeriod", ipt.sync_period.as_deref())?.filter(|d| !d.is_zero());
        }
        go_duration("iptables.minSyncPeriod", ipt.min_sync_period.as_deref())?;
        na(
            "iptables.minSyncPeriod",
            nonzero(&ipt.min_sync_period),
            "kpx applies each update as it arrives (the controlplane coalesces bursts)",
        );
    }
    if let Some(ipvs) = f.ipvs {
        if ipvs_mode {
            s.sync_period = go_duration("ipvs.syncPeriod", ipvs.sync_period.as_deref())?.filter(|d| !d.is_zero());
        }
        go_duration("ipvs.minSyncPeriod", ipvs.min_sync_period.as_deref())?;
        na(
            "ipvs.minSyncPeriod",
            nonzero(&ipvs.min_sync_period),
            "kpx applies each update as it arrives (the controlplane coalesces bursts)",
        );
        if let Some(sched) = ipvs.scheduler.filter(|s| !s.is_empty()) {
            if !crate::backend::ipvs::plan::SCHEDULERS.contains(&sched.as_str()) {
                let known = crate::backend::ipvs::plan::SCHEDULERS.join(", ");
                return Err(error("ipvs.scheduler", format!("{sched:?} is not one of {known}")));
            }
            s.ipvs_scheduler = Some(sched);
        }
        if let Some(list) = ipvs.exclude_cidrs.filter(|l| !l.is_empty()) {
            for (i, c) in list.iter().enumerate() {
                cidr(c).map_err(|m| error(&format!("ipvs.excludeCIDRs[{i}]"), m))?;
            }
            s.ipvs_exclude_cidrs = Some(list);
        }
        s.ipvs_strict_arp = ipvs.strict_arp;
        s.ipvs_tcp_timeout = go_duration("ipvs.tcpTimeout", ipvs.tcp_timeout.as_deref())?;
        s.ipvs_tcp_fin_timeout = go_duration("ipvs.tcpFinTimeout", ipvs.tcp_fin_timeout.as_deref())?;
        s.ipvs_udp_timeout = go_duration("ipvs.udpTimeout", ipvs.udp_timeout.as_deref())?;
    }
    if let Some(ct) = f.conntrack {
        let count = |field: &str, v: Option<i32>| match v {
            Some(n) if n < 0 => Err(error(field, format!("{n} is negative"))),
            other => Ok(other.map(|n| n as u32)),
        };
        s.conntrack = Conntrack {
            max_per_core: count("conntrack.maxPerCore", ct.max_per_core)?,
            min: count("conntrack.min", ct.min)?,
            tcp_established_timeout: go_duration(
                "conntrack.tcpEstablishedTimeout",
                ct.tcp_established_timeout.as_deref(),
            )?,
            tcp_close_wait_timeout: go_duration("conntrack.tcpCloseWaitTimeout", ct.tcp_close_wait_timeout.as_deref())?,
            tcp_be_liberal: ct.tcp_be_liberal,
            udp_timeout: go_duration("conntrack.udpTimeout", ct.udp_timeout.as_deref())?,
            udp_stream_timeout: go_duration("conntrack.udpStreamTimeout", ct.udp_stream_timeout.as_deref())?,
        };
    }
    if let Some(log) = f.logging {
        s.log_format = match log.format.as_deref() {
            None | Some("") | Some("text") => None,
            Some("json") => Some("json".into()),
            Some(other) => return Err(error("logging.format", format!("{other:?} is not text or json"))),
        };
        na(
            "logging.verbosity",
            log.verbosity.is_some() || log.vmodule.is_some(),
            "kpx's log levels come from RUST_LOG",
        );
    }
    s.not_applicable = notes;
    Ok(s)
}

fn nonempty(s: &Option<String>) -> bool {
    s.as_deref().is_some_and(|s| !s.is_empty())
}

/// A duration that is set and not zero (kubeadm writes `0s` for "unset").
fn nonzero(s: &Option<String>) -> bool {
    s.as_deref().is_some_and(|d| parse_go_duration(d).is_ok_and(|d| !d.is_zero()))
}

fn go_duration(field: &str, text: Option<&str>) -> Result<Option<Duration>, ConfigError> {
    match text {
        None | Some("") => Ok(None),
        Some(t) => parse_go_duration(t).map(Some).map_err(|m| error(field, m)),
    }
}

/// Checks a CIDR such as 10.244.0.0/16 (an address alone is refused: kube-proxy wants a CIDR).
fn cidr(text: &str) -> Result<(), String> {
    let (addr, len) = text.split_once('/').ok_or_else(|| format!("{text:?} is not a CIDR like 10.0.0.0/8"))?;
    let addr: IpAddr = addr.parse().map_err(|_| format!("{text:?} is not a CIDR like 10.0.0.0/8"))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    match len.parse::<u8>() {
        Ok(l) if l <= max => Ok(()),
        _ => Err(format!("{text:?} has an invalid prefix length")),
    }
}

/// kube-proxy's `IP:PORT` or bare `IP` (then the default port); "" leaves the default.
fn bind_address(field: &str, text: Option<&str>, default_port: u16) -> Result<Option<SocketAddr>, ConfigError> {
    let Some(text) = text.filter(|t| !t.is_empty()) else { return Ok(None) };
    if let Ok(a) = text.parse::<SocketAddr>() {
        return Ok(Some(a));
    }
    match text.parse::<IpAddr>() {
        Ok(ip) => Ok(Some(SocketAddr::new(ip, default_port))),
        Err(_) => Err(error(field, format!("{text:?} is not an address like 0.0.0.0:{default_port}"))),
    }
}
