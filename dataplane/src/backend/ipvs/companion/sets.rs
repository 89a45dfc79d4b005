//! kube-proxy's ipvs-mode ipsets: names (IPv6 ones prefixed `KUBE-6-` and cut to ipset's 31
//! characters, as kube-proxy cuts them), types and the comments of the rules that use them.

use kpx_ipvs_netlink::{Family, Protocol};

/// One set, by role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Set {
    LoopBack,
    ClusterIp,
    ExternalIp,
    ExternalIpLocal,
    LoadBalancer,
    LoadBalancerLocal,
    LoadBalancerFw,
    LoadBalancerSourceCidr,
    LoadBalancerSourceIp,
    NodePort(Protocol),
    NodePortLocal(Protocol),
    HealthCheckNodePort,
    /// The addresses on kube-ipvs0: new connections to them on other ports are rejected.
    IpvsIps,
}

/// ipset's longest name (IPSET_MAXNAMELEN less the terminating NUL).
const MAX_NAME: usize = 31;

/// Above ipset's default of 65536: at that many service ports kube-proxy's sets are full; a hash
/// set only allocates what it holds.
const MAX_ELEM: u32 = 1 << 22;

impl Set {
    pub const ALL: [Set; 17] = [
        Set::LoopBack,
        Set::ClusterIp,
        Set::ExternalIp,
        Set::ExternalIpLocal,
        Set::LoadBalancer,
        Set::LoadBalancerLocal,
        Set::LoadBalancerFw,
        Set::LoadBalancerSourceCidr,
        Set::LoadBalancerSourceIp,
        Set::NodePort(Protocol::Tcp),
        Set::NodePort(Protocol::Udp),
        Set::NodePort(Protocol::Sctp),
        Set::NodePortLocal(Protocol::Tcp),
        Set::NodePortLocal(Protocol::Udp),
        Set::NodePortLocal(Protocol::Sctp),
        Set::HealthCheckNodePort,
        Set::IpvsIps,
    ];

    fn base(self) -> &'static str {
        match self {
            Set::LoopBack => "LOOP-BACK",
            Set::ClusterIp => "CLUSTER-IP",
            Set::ExternalIp => "EXTERNAL-IP",
            Set::ExternalIpLocal => "EXTERNAL-IP-LOCAL",
            Set::LoadBalancer => "LOAD-BALANCER",
            Set::LoadBalancerLocal => "LOAD-BALANCER-LOCAL",
            Set::LoadBalancerFw => "LOAD-BALANCER-FW",
            Set::LoadBalancerSourceCidr => "LOAD-BALANCER-SOURCE-CIDR",
            Set::LoadBalancerSourceIp => "LOAD-BALANCER-SOURCE-IP",
            Set::NodePort(Protocol::Udp) => "NODE-PORT-UDP",
            Set::NodePort(Protocol::Sctp) => "NODE-PORT-SCTP-HASH",
            Set::NodePort(_) => "NODE-PORT-TCP",
            Set::NodePortLocal(Protocol::Udp) => "NODE-PORT-LOCAL-UDP",
            Set::NodePortLocal(Protocol::Sctp) => "NODE-PORT-LOCAL-SCTP-HASH",
            Set::NodePortLocal(_) => "NODE-PORT-LOCAL-TCP",
            Set::HealthCheckNodePort => "HEALTH-CHECK-NODE-PORT",
            Set::IpvsIps => "IPVS-IPS",
        }
    }

    pub fn name(self, family: Family) -> String {
        let mut name = match family {
            Family::Inet => format!("KUBE-{}", self.base()),
            Family::Inet6 => format!("KUBE-6-{}", self.base()),
        };
        name.truncate(MAX_NAME);
        name
    }

    /// The temporary set a replacement of set number `index` is built in.
    pub fn temp(family: Family, index: usize) -> String {
        let v = if family == Family::Inet { 4 } else { 6 };
        format!("KPX-T{v}-{index}")
    }

    /// `ipset create` type and options.
    pub fn kind(self, family: Family) -> String {
        let f = if family == Family::Inet { "inet" } else { "inet6" };
        let hash = |t: &str| format!("{t} family {f} maxelem {MAX_ELEM}");
        match self {
            Set::LoopBack | Set::LoadBalancerSourceIp => hash("hash:ip,port,ip"),
            Set::LoadBalancerSourceCidr => hash("hash:ip,port,net"),
            Set::IpvsIps => hash("hash:ip"),
            Set::NodePort(Protocol::Sctp) | Set::NodePortLocal(Protocol::Sctp) => hash("hash:ip,port"),
            Set::NodePort(_) | Set::NodePortLocal(_) | Set::HealthCheckNodePort => "bitmap:port range 0-65535".into(),
            _ => hash("hash:ip,port"),
        }
    }

    /// How a rule matches the set (`--match-set NAME TYPE`).
    pub fn match_type(self) -> &'static str {
        match self {
            Set::LoopBack | Set::LoadBalancerSourceCidr | Set::LoadBalancerSourceIp => "dst,dst,src",
            Set::IpvsIps | Set::HealthCheckNodePort => "dst",
            Set::NodePort(p) | Set::NodePortLocal(p) if p != Protocol::Sctp => "dst",
            _ => "dst,dst",
        }
    }

    /// The comment of the rules that match the set, as kube-proxy words it.
    pub fn comment(self) -> &'static str {
        match self {
            Set::LoopBack => "Kubernetes endpoints dst ip:port, source ip for solving hairpin purpose",
            Set::ClusterIp => "Kubernetes service cluster ip + port for masquerade purpose",
            Set::ExternalIp => "Kubernetes service external ip + port for masquerade and filter purpose",
            Set::ExternalIpLocal => "Kubernetes service external ip + port with externalTrafficPolicy=local",
            Set::LoadBalancer => "Kubernetes service lb portal",
            Set::LoadBalancerLocal => "Kubernetes service load balancer ip + port with externalTrafficPolicy=local",
            Set::LoadBalancerFw => "Kubernetes service load balancer ip + port for load balancer with sourceRange",
            Set::LoadBalancerSourceCidr => {
                "Kubernetes service load balancer ip + port + source cidr for packet filter purpose"
            }
            Set::LoadBalancerSourceIp => {
                "Kubernetes service load balancer ip + port + source IP for packet filter purpose"
            }
            Set::NodePort(Protocol::Udp) => "Kubernetes nodeport UDP port for masquerade purpose",
            Set::NodePort(Protocol::Sctp) => "Kubernetes nodeport SCTP port for masquerade purpose",
            Set::NodePort(_) => "Kubernetes nodeport TCP port for masquerade purpose",
            Set::NodePortLocal(Protocol::Udp) => "Kubernetes nodeport UDP port with externalTrafficPolicy=local",
            Set::NodePortLocal(Protocol::Sctp) => "Kubernetes nodeport SCTP port with externalTrafficPolicy=local",
            Set::NodePortLocal(_) => "Kubernetes nodeport TCP port with externalTrafficPolicy=local",
            Set::HealthCheckNodePort => "Kubernetes health check node port",
            Set::IpvsIps => "IPVS service ip + port",
        }
    }
}
