//! Exercises every client call against a real IPVS kernel (run as root inside user-mode Linux
//! with ip_vs loaded and lo up). Prints one line per check and exits non-zero on the first failure.

use std::net::SocketAddr;

use kpx_ipvs_netlink::{Destination, Family, IpvsClient, IpvsError, Protocol, Service, Timeouts};

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut c = IpvsClient::new()?;
    println!("family id {}", c.family_id());
    c.flush()?;

    let v4 = Service::new(Protocol::Tcp, sa("10.96.0.10:80"), "rr");
    let v6 = Service::new(Protocol::Udp, sa("[fd00::10]:53"), "sh").with_persistence(10800);
    let fwm = Service::fwmark(Family::Inet, 42, "wrr");
    for s in [&v4, &v6, &fwm] {
        c.add_service(s)?;
    }
    match c.add_service(&v4) {
        Err(IpvsError::Exists { request }) => println!("duplicate service -> Exists ({request})"),
        other => return Err(format!("duplicate service: {other:?}").into()),
    }
    let d1 = Destination::new(sa("10.244.1.2:8080"), 1);
    let d2 = Destination::new(sa("10.244.1.3:8080"), 2);
    c.add_destination(&v4, &d1)?;
    c.add_destination(&v4, &d2)?;
    c.add_destination(&v6, &Destination::new(sa("[fd00::1:2]:53"), 1))?;
    match c.add_destination(&v4, &d1) {
        Err(IpvsError::Exists { request }) => println!("duplicate destination -> Exists ({request})"),
        other => return Err(format!("duplicate destination: {other:?}").into()),
    }
    let mut services: Vec<Service> = c.services()?.into_iter().map(|i| i.service).collect();
    services.sort_by_key(|s| s.to_string());
    let mut want = vec![v4.clone(), v6.clone(), fwm.clone()];
    want.sort_by_key(|s| s.to_string());
    assert_eq!(services, want, "dumped services");
    println!("services round trip: {}", services.len());

    c.update_destination(&v4, &Destination { weight: 0, ..d1.clone() })?;
    let dests = c.destinations(&v4)?;
    assert_eq!(dests.len(), 2);
    assert!(dests.iter().any(|d| d.dest == Destination { weight: 0, ..d1.clone() }), "{dests:?}");
    println!("destinations after weight 0: {dests:?}");

    c.update_service(&Service { scheduler: "lc".into(), ..v4.clone() })?;
    assert_eq!(c.service(&v4)?.map(|i| i.service.scheduler), Some("lc".into()));
    c.delete_destination(&v4, &d2)?;
    match c.delete_destination(&v4, &d2) {
        Err(IpvsError::NotFound { request }) => println!("deleting twice -> NotFound ({request})"),
        other => return Err(format!("deleting twice: {other:?}").into()),
    }
    c.delete_service(&fwm)?;
    assert_eq!(c.service(&fwm)?, None);

    c.set_timeouts(&Timeouts { tcp: 901, tcp_fin: 121, udp: 301 })?;
    assert_eq!(c.timeouts()?, Timeouts { tcp: 901, tcp_fin: 121, udp: 301 });
    println!("timeouts round trip");

    // A dump far over one 32 KiB datagram.
    let before = c.messages_sent();
    for i in 0..2000u32 {
        let s = Service::new(Protocol::Tcp, SocketAddr::from(([10, 100, (i / 250) as u8, (i % 250) as u8], 80)), "rr");
        c.add_service(&s)?;
        for j in 0..5u8 {
            c.add_destination(&s, &Destination::new(SocketAddr::from(([10, 200, j, (i % 250) as u8], 8080)), 1))?;
        }
    }
    println!("12000 operations in {} messages", c.messages_sent() - before);
    let all = c.services()?;
    assert_eq!(all.len(), 2002);
    let one = all.iter().find(|i| i.service.port == 80 && i.service.addr.to_string() == "10.100.7.249").unwrap();
    assert_eq!(c.destinations(&one.service)?.len(), 5);
    println!("dumped {} services", all.len());
    c.flush()?;
    assert!(c.services()?.is_empty());
    println!("SMOKE OK");
    Ok(())
}
