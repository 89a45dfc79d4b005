//! What the ipvs backend reads from and sets on the host besides IPVS: the node's addresses
//! (for NodePorts when none are configured), which iptables variant works, and sysctls.

use std::net::IpAddr;

use crate::backend::iptables::exec::Runner;

/// `restore_cmd` if its iptables can read the nat table, else the legacy variant if that can
/// (a kernel without nf_tables, like UML's), else `restore_cmd` (whose failure will then be
/// reported by the first sync).
pub fn working_restore_cmd(restore_cmd: &str) -> String {
    let works = |restore: &str| {
        let iptables = restore.replacen("-restore", "", 1);
        Runner::default().run(&[&iptables, "-w", "5", "-t", "nat", "-S", "POSTROUTING"], &[]).is_ok_and(|r| r.success)
    };
    if works(restore_cmd) || restore_cmd.contains("-legacy") {
        return restore_cmd.to_string();
    }
    let legacy = restore_cmd.replacen("-restore", "-legacy-restore", 1);
    if works(&legacy) {
        tracing::info!(%legacy, "ipvs: {restore_cmd} does not work here, using the legacy variant");
        return legacy;
    }
    restore_cmd.to_string()
}

/// The addresses in `ip -o addr show` output, less loopback, link-local and `skip_dev`'s.
pub fn node_addresses(ip_o_addr: &str, skip_dev: &str) -> Vec<IpAddr> {
    ip_o_addr
        .lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            let dev = words.nth(1)?;
            if dev == skip_dev {
                return None;
            }
            let mut rest = words.skip_while(|w| *w != "inet" && *w != "inet6");
            rest.next()?;
            rest.next()?.split('/').next()?.parse().ok()
        })
        .filter(|ip: &IpAddr| !ip.is_loopback() && !matches!(ip, IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80))
        .collect()
}

/// Whether `ip` lies in one of `cidrs` ("10.0.0.0/8"); an invalid CIDR matches nothing.
pub fn in_cidrs(ip: IpAddr, cidrs: &[String]) -> bool {
    let bits = |ip: IpAddr| match ip {
        IpAddr::V4(v) => u128::from(u32::from(v)) << 96,
        IpAddr::V6(v) => u128::from(v),
    };
    cidrs.iter().any(|c| {
        let Some((net, len)) = c.split_once('/') else { return false };
        let (Ok(net), Ok(len)) = (net.parse::<IpAddr>(), len.parse::<u32>()) else { return false };
        // IPv4 addresses sit in the top 32 bits, so a prefix length counts from the top for both.
        let max = if net.is_ipv4() { 32 } else { 128 };
        if net.is_ipv4() != ip.is_ipv4() || len > max {
            return false;
        }
        let mask = if len == 0 { 0 } else { u128::MAX << (128 - len) };
        bits(ip) & mask == bits(net) & mask
    })
}

/// The addresses in `ip -o addr show` output that lie in one of `cidrs` (loopback included:
/// kube-proxy's nodePortAddresses may name 127.0.0.0/8 for localhost node ports).
pub fn addresses_in(ip_o_addr: &str, cidrs: &[String]) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = ip_o_addr
        .lines()
        .filter_map(|l| {
            let mut rest = l.split_whitespace().skip_while(|w| *w != "inet" && *w != "inet6");
            rest.next()?;
            rest.next()?.split('/').next()?.parse().ok()
        })
        .filter(|ip| in_cidrs(*ip, cidrs))
        .collect();
    out.dedup();
    out
}

/// What kube-proxy's ipvs mode sets: IPVS connections go through conntrack (for the
/// masquerade rules), connections to deleted real servers and stale persistence templates
/// expire, forwarding is on, and with `strict_arp` (its ipvs.strictARP) VIPs on the dummy
/// interface are not answered for in ARP.
pub fn set_sysctls(strict_arp: bool) {
    let arp = [("net/ipv4/conf/all/arp_ignore", "1"), ("net/ipv4/conf/all/arp_announce", "2")];
    for (key, value) in [
        ("net/ipv4/vs/conntrack", "1"),
        ("net/ipv4/vs/expire_nodest_conn", "1"),
        ("net/ipv4/vs/expire_quiescent_template", "1"),
        ("net/ipv4/ip_forward", "1"),
    ]
    .into_iter()
    .chain(arp.into_iter().filter(|_| strict_arp))
    {
        if let Err(error) = std::fs::write(format!("/proc/sys/{key}"), value) {
            tracing::warn!(%key, %error, "cannot set sysctl");
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn node_addresses_leave_out_loopback_link_local_and_the_vip_interface() {
        let out = "1: lo    inet 127.0.0.1/8 scope host lo\\       valid_lft forever
2: eth0    inet 192.168.0.10/24 brd 192.168.0.255 scope global eth0\\       valid_lft forever
2: eth0    inet6 fd00:1::10/64 scope global \\       valid_lft forever
2: eth0    inet6 fe80::1/64 scope link \\       valid_lft forever
5: kube-ipvs0    inet 10.96.0.10/32 scope global kube-ipvs0\\       valid_lft forever
";
        let ips: Vec<String> = super::node_addresses(out, "kube-ipvs0").iter().map(|i| i.to_string()).collect();
        assert_eq!(ips, ["192.168.0.10", "fd00:1::10"]);
        let cidrs = ["192.168.0.0/16".to_string(), "127.0.0.0/8".into(), "fd00:1::/64".into()];
        let ips: Vec<String> = super::addresses_in(out, &cidrs).iter().map(|i| i.to_string()).collect();
        assert_eq!(ips, ["127.0.0.1", "192.168.0.10", "fd00:1::10"]);
        assert!(super::addresses_in(out, &["172.16.0.0/12".into()]).is_empty());
        assert!(super::in_cidrs("10.96.0.10".parse().unwrap(), &["10.0.0.0/8".into()]));
        assert!(!super::in_cidrs("10.96.0.10".parse().unwrap(), &["fd00::/8".into(), "10.0.0.0/33".into()]));
    }
}
