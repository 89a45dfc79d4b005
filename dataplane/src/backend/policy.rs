//! kube-proxy's traffic-policy decision for one service port, shared by the iptables and
//! nftables renderers: which of the port's two endpoint sets (all usable endpoints, "cluster";
//! this node's, "local") its internal traffic (cluster IP) and its external traffic (node port,
//! external and load-balancer IPs) go to, which sets are used at all, and whether a port with
//! no usable endpoint here has endpoints elsewhere (DROP, as kube-proxy, rather than REJECT).

use kpx_proto::v1 as pb;

use super::iptables::render::IpFamily;

/// One of a service port's endpoint sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Set {
    Cluster,
    Local,
}

/// What the traffic policies make of one service port on this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// The cluster set is used (by internal traffic, or by external traffic short-circuited).
    pub cluster_used: bool,
    /// The local set is used.
    pub local_used: bool,
    /// Where internal traffic goes; None: nowhere (no endpoint it may use).
    pub internal: Option<Set>,
    /// Where external traffic goes; None: nowhere.
    pub external: Option<Set>,
    /// External traffic has an entry point (a node port, external or LB IP) and somewhere to go.
    pub external_used: bool,
    /// The service has endpoints in this family somewhere, even if none here may take traffic.
    pub exists_elsewhere: bool,
}

/// kube-proxy's decision for a port of S with HAS_CLUSTER / HAS_LOCAL usable endpoints in the
/// two sets and HAS_EXTERNAL entry points, in FAMILY.
pub fn decide(s: &pb::Service, family: IpFamily, has_cluster: bool, has_local: bool, has_external: bool) -> Decision {
    let (itp, etp) = (s.internal_policy_local, s.external_policy_local);
    let cluster_used = has_cluster && (!itp || has_external);
    let local_used = has_local && (itp || (etp && has_external));
    let internal = match itp {
        true => local_used.then_some(Set::Local),
        false => cluster_used.then_some(Set::Cluster),
    };
    let external = match etp {
        true => has_local.then_some(Set::Local),
        false => has_cluster.then_some(Set::Cluster),
    };
    let external_used = has_external && (external.is_some() || (etp && cluster_used));
    let exists_elsewhere = has_cluster || has_local || lists_family(&s.families_with_endpoints, family);
    Decision { cluster_used, local_used, internal, external, external_used, exists_elsewhere }
}

/// `families_with_endpoints` (of pb::Service) names FAMILY.
pub fn lists_family(families: &[String], family: IpFamily) -> bool {
    let name = match family {
        IpFamily::V4 => "IPv4",
        IpFamily::V6 => "IPv6",
    };
    families.iter().any(|f| f == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(itp: bool, etp: bool) -> pb::Service {
        pb::Service { internal_policy_local: itp, external_policy_local: etp, ..Default::default() }
    }

    #[test]
    fn cluster_policies_use_the_cluster_set_for_both() {
        let d = decide(&svc(false, false), IpFamily::V4, true, true, true);
        assert_eq!((d.internal, d.external), (Some(Set::Cluster), Some(Set::Cluster)));
        assert!(d.cluster_used && !d.local_used && d.external_used);
    }

    #[test]
    fn both_local_and_reachable_from_outside_keeps_the_cluster_set_for_short_circuits() {
        // kube-proxy's UsesClusterEndpoints: pods and the host reach the node port through it.
        let d = decide(&svc(true, true), IpFamily::V4, true, false, true);
        assert_eq!((d.internal, d.external), (None, None));
        assert!(d.cluster_used && !d.local_used && d.external_used);
        // Without an entry point from outside, only the local set.
        let d = decide(&svc(true, true), IpFamily::V4, true, true, false);
        assert_eq!(
            (d.internal, d.external, d.cluster_used, d.external_used),
            (Some(Set::Local), Some(Set::Local), false, false)
        );
    }

    #[test]
    fn no_local_endpoint_is_told_from_none_anywhere_by_the_family_hint() {
        let mut s = svc(false, true);
        assert!(!decide(&s, IpFamily::V6, false, false, true).exists_elsewhere);
        s.families_with_endpoints = vec!["IPv6".into()];
        assert!(decide(&s, IpFamily::V6, false, false, true).exists_elsewhere);
        assert!(!decide(&s, IpFamily::V4, false, false, true).exists_elsewhere);
    }
}
