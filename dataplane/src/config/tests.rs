use super::*;

/// kubeadm's kube-proxy ConfigMap (config.conf) as a 1.28 cluster has it, with a few values
/// changed from the defaults.
const KUBEADM: &str = r#"
apiVersion: kubeproxy.config.k8s.io/v1alpha1
bindAddress: 0.0.0.0
bindAddressHardFail: false
clientConnection:
  acceptContentTypes: ""
  burst: 0
  contentType: ""
  kubeconfig: /var/lib/kube-proxy/kubeconfig.conf
  qps: 0
clusterCIDR: 10.244.0.0/16,fd00:10:244::/56
configSyncPeriod: 0s
conntrack:
  maxPerCore: null
  min: null
  tcpCloseWaitTimeout: null
  tcpEstablishedTimeout: 12h0m0s
detectLocal:
  bridgeInterface: ""
  interfaceNamePrefix: ""
detectLocalMode: ""
enableProfiling: false
healthzBindAddress: ""
hostnameOverride: ""
iptables:
  localhostNodePorts: null
  masqueradeAll: true
  masqueradeBit: null
  minSyncPeriod: 1s
  syncPeriod: 0s
ipvs:
  excludeCIDRs: null
  minSyncPeriod: 0s
  scheduler: lc
  strictARP: true
  syncPeriod: 20s
  tcpFinTimeout: 0s
  tcpTimeout: 0s
  udpTimeout: 0s
kind: KubeProxyConfiguration
logging:
  flushFrequency: 0
  options:
    json:
      infoBufferSize: "0"
  verbosity: 0
metricsBindAddress: 0.0.0.0:10249
mode: ipvs
nodePortAddresses: ["192.168.0.0/16", "127.0.0.0/8"]
oomScoreAdj: null
portRange: ""
showHiddenMetricsForVersion: ""
winkernel:
  enableDSR: false
"#;

#[test]
fn a_kubeadm_configmap_reads() {
    let s = parse(KUBEADM).unwrap();
    assert_eq!(s.mode, Some(Mode::Ipvs));
    assert_eq!(s.cluster_cidr.as_deref(), Some("10.244.0.0/16,fd00:10:244::/56"));
    assert_eq!(s.masquerade_all, Some(true));
    assert_eq!(s.localhost_node_ports, None);
    // ipvs mode: ipvs.syncPeriod, not iptables.syncPeriod.
    assert_eq!(s.sync_period, Some(Duration::from_secs(20)));
    assert_eq!(s.ipvs_scheduler.as_deref(), Some("lc"));
    assert_eq!(s.ipvs_strict_arp, Some(true));
    assert_eq!(s.ipvs_tcp_timeout, Some(Duration::ZERO));
    assert_eq!(s.healthz_bind_address, None, "\"\" keeps the default");
    assert_eq!(s.metrics_bind_address, Some("0.0.0.0:10249".parse().unwrap()));
    assert_eq!(s.node_port_addresses.as_deref(), Some(&["192.168.0.0/16".to_string(), "127.0.0.0/8".into()][..]));
    assert_eq!(s.conntrack.tcp_established_timeout, Some(Duration::from_secs(12 * 3600)));
    assert_eq!(s.conntrack.max_per_core, None);
    assert_eq!(s.node_name, None);
    let reported: Vec<&str> = s.not_applicable.iter().map(|n| n.split(':').next().unwrap()).collect();
    assert_eq!(
        reported,
        ["bindAddress", "clientConnection", "winkernel", "iptables.minSyncPeriod", "logging.verbosity"]
    );
}

#[test]
fn unknown_and_invalid_fields_are_named() {
    let cases = [
        ("iptables:\n  masqueradeBitt: 14\n", "iptables.masqueradeBitt", "unknown field `masqueradeBitt`"),
        ("modee: ipvs\n", "modee", "unknown field `modee`"),
        ("mode: userspace\n", "mode", "\"userspace\" is not iptables, ipvs or nftables"),
        ("iptables:\n  syncPeriod: 30\n", "iptables.syncPeriod", "invalid type: integer `30`"),
        ("iptables:\n  syncPeriod: 30x\n", "iptables.syncPeriod", "not a duration"),
        ("iptables:\n  masqueradeBit: 15\n", "iptables.masqueradeBit", "bit 14"),
        ("iptables:\n  masqueradeBit: 40\n", "iptables.masqueradeBit", "not a bit number"),
        ("iptables:\n  masqueradeAll: maybe\n", "iptables.masqueradeAll", "invalid type"),
        ("ipvs:\n  scheduler: fastest\n", "ipvs.scheduler", "is not one of rr"),
        ("ipvs:\n  excludeCIDRs: [10.0.0.0/33]\n", "ipvs.excludeCIDRs[0]", "invalid prefix length"),
        ("clusterCIDR: 10.244.0.0\n", "clusterCIDR", "not a CIDR"),
        ("nodePortAddresses: [192.168.0.0/16, nope]\n", "nodePortAddresses[1]", "not a CIDR"),
        ("healthzBindAddress: localhost:10256\n", "healthzBindAddress", "not an address"),
        ("conntrack:\n  maxPerCore: -1\n", "conntrack.maxPerCore", "negative"),
        ("conntrack:\n  udpTimeout: 1d\n", "conntrack.udpTimeout", "not a duration"),
        ("detectLocalMode: NodeCIDR\n", "detectLocalMode", "not supported"),
        ("logging:\n  format: xml\n", "logging.format", "not text or json"),
        ("clientConnection:\n  kubeconfig: /x\n  qpss: 5\n", "clientConnection.qpss", "unknown field `qpss`"),
    ];
    for (body, field, message) in cases {
        let text = format!("apiVersion: {API_VERSION}\nkind: {KIND}\n{body}");
        let err = parse(&text).expect_err(body);
        assert_eq!(err.field, field, "{body}: {err}");
        assert!(err.message.contains(message), "{body}: {err}");
    }
    let err = parse("apiVersion: kubeproxy.config.k8s.io/v1beta1\nkind: KubeProxyConfiguration\n").unwrap_err();
    assert_eq!(err.field, "apiVersion");
    assert_eq!(parse("kind: KubeProxyConfiguration\n").unwrap_err().field, "apiVersion");
    assert_eq!(parse(&format!("apiVersion: {API_VERSION}\nkind: KubeletConfiguration\n")).unwrap_err().field, "kind");
    assert_eq!(parse("{not yaml: [").unwrap_err().field, ".");
    assert_eq!(parse("").unwrap_err().field, ".");
    assert_eq!(parse("- a\n- b\n").unwrap_err().field, ".");
}

#[test]
fn iptables_mode_settings_and_defaults() {
    let text = format!(
        "apiVersion: {API_VERSION}\nkind: {KIND}\nhostnameOverride: Node-7\nhealthzBindAddress: 127.0.0.1\n\
         iptables:\n  syncPeriod: 1m0s\n  localhostNodePorts: false\nipvs:\n  syncPeriod: 5s\n\
         conntrack:\n  maxPerCore: 0\n  min: 262144\n  tcpBeLiberal: true\nlogging:\n  format: json\n"
    );
    let s = parse(&text).unwrap();
    assert_eq!(s.mode, Some(Mode::Iptables), "mode unset is iptables, as kube-proxy on Linux");
    assert_eq!(s.node_name.as_deref(), Some("node-7"), "lower-cased, as kube-proxy does");
    assert_eq!(s.sync_period, Some(Duration::from_secs(60)), "iptables mode: iptables.syncPeriod");
    assert_eq!(s.localhost_node_ports, Some(false));
    assert_eq!(s.healthz_bind_address, Some("127.0.0.1:10256".parse().unwrap()));
    assert_eq!(s.conntrack.max_per_core, Some(0));
    assert_eq!(s.conntrack.min, Some(262144));
    assert_eq!(s.conntrack.tcp_be_liberal, Some(true));
    assert_eq!(s.log_format.as_deref(), Some("json"));
    assert!(s.not_applicable.is_empty(), "{:?}", s.not_applicable);
}

#[test]
fn nftables_mode_selects_the_nftables_backend() {
    let s =
        parse("apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nmode: nftables\n").unwrap();
    assert_eq!(s.mode, Some(Mode::Nftables));
}
