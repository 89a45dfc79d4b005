//! Codec tests on bytes. Expected bytes are written out by hand from the uapi layout
//! (little-endian hosts; netlink integers are host order, ports network order).

use std::net::{IpAddr, SocketAddr};

use netlink_packet_core::{DefaultNla, NLM_F_MULTIPART};

use crate::attr::{CmdAttr, DestAttr, SvcAttr};
use crate::consts::*;
use crate::convert;
use crate::message::{IpvsMessage, Request, decode_family_id, encode_get_family};
use crate::reply::{Exchange, Frame, Progress, ReplyError, frames};
use crate::*;

const FAMILY: u16 = 0x24;

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn svc() -> Service {
    Service::new(Protocol::Tcp, sa("10.96.0.10:80"), "rr")
}

fn dest() -> Destination {
    Destination::new(sa("10.244.1.2:8080"), 1)
}

/// Encode, split into frames, decode: what the kernel would parse.
fn through_wire(req: &Request) -> Request {
    let bytes = req.encode(FAMILY, 7);
    let f = frames(&bytes).unwrap();
    assert_eq!(f.len(), 1);
    let Frame::Message { msg_type, flags, seq, payload } = f[0] else { panic!("not a message: {:?}", f[0]) };
    assert_eq!((msg_type, flags, seq), (FAMILY, req.flags(), 7));
    Request::from_message(&IpvsMessage::decode(payload).unwrap(), req.is_dump()).unwrap()
}

/// A complete netlink message around an IPVS payload, as the kernel sends it in a dump.
fn kernel_msg(msg: &IpvsMessage, seq: u32) -> Vec<u8> {
    msg.encode(FAMILY, NLM_F_MULTIPART, seq)
}

fn nlmsg(msg_type: u16, seq: u32, code: i32) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&20u32.to_ne_bytes());
    b.extend_from_slice(&msg_type.to_ne_bytes());
    b.extend_from_slice(&NLM_F_MULTIPART.to_ne_bytes());
    b.extend_from_slice(&seq.to_ne_bytes());
    b.extend_from_slice(&0u32.to_ne_bytes());
    b.extend_from_slice(&code.to_ne_bytes());
    b
}

fn done(seq: u32) -> Vec<u8> {
    nlmsg(3, seq, 0)
}

fn error(seq: u32, errno: i32) -> Vec<u8> {
    nlmsg(2, seq, errno)
}

#[cfg(target_endian = "little")]
#[test]
fn new_service_bytes_match_kernel_layout() {
    #[rustfmt::skip]
    let expected: Vec<u8> = vec![
        104, 0, 0, 0,   0x24, 0,   5, 0,   7, 0, 0, 0,   0, 0, 0, 0, // nlmsghdr: REQUEST|ACK, seq 7
        IPVS_CMD_NEW_SERVICE, 1, 0, 0,                                // genlmsghdr, version 1
        84, 0, 0x01, 0x80,                                            // IPVS_CMD_ATTR_SERVICE | NLA_F_NESTED
        6, 0, 1, 0,    2, 0, 0, 0,                                    // AF = AF_INET
        6, 0, 2, 0,    6, 0, 0, 0,                                    // PROTOCOL = TCP
        20, 0, 3, 0,   10, 96, 0, 10,  0, 0, 0, 0,  0, 0, 0, 0,  0, 0, 0, 0, // ADDR, 16 bytes
        6, 0, 4, 0,    0, 80, 0, 0,                                   // PORT 80, network order
        7, 0, 6, 0,    b'r', b'r', 0, 0,                              // SCHED_NAME "rr\0"
        12, 0, 7, 0,   0, 0, 0, 0,   0xff, 0xff, 0xff, 0xff,          // FLAGS {flags 0, mask ~0}
        8, 0, 8, 0,    0, 0, 0, 0,                                    // TIMEOUT 0
        8, 0, 9, 0,    0xff, 0xff, 0xff, 0xff,                        // NETMASK 255.255.255.255
    ];
    assert_eq!(Request::NewService(svc()).encode(FAMILY, 7), expected);
}

#[cfg(target_endian = "little")]
#[test]
fn new_destination_bytes_match_kernel_layout() {
    #[rustfmt::skip]
    let expected: Vec<u8> = vec![
        140, 0, 0, 0,   0x24, 0,   5, 0,   9, 0, 0, 0,   0, 0, 0, 0,
        IPVS_CMD_NEW_DEST, 1, 0, 0,
        48, 0, 0x01, 0x80,                                            // service key only
        6, 0, 1, 0,    2, 0, 0, 0,
        6, 0, 2, 0,    6, 0, 0, 0,
        20, 0, 3, 0,   10, 96, 0, 10,  0, 0, 0, 0,  0, 0, 0, 0,  0, 0, 0, 0,
        6, 0, 4, 0,    0, 80, 0, 0,
        72, 0, 0x02, 0x80,                                            // IPVS_CMD_ATTR_DEST | NLA_F_NESTED
        20, 0, 1, 0,   10, 244, 1, 2,  0, 0, 0, 0,  0, 0, 0, 0,  0, 0, 0, 0, // ADDR
        6, 0, 2, 0,    0x1f, 0x90, 0, 0,                              // PORT 8080
        6, 0, 11, 0,   2, 0, 0, 0,                                    // ADDR_FAMILY = AF_INET
        8, 0, 3, 0,    0, 0, 0, 0,                                    // FWD_METHOD = MASQ
        8, 0, 4, 0,    1, 0, 0, 0,                                    // WEIGHT 1
        8, 0, 5, 0,    0, 0, 0, 0,                                    // U_THRESH
        8, 0, 6, 0,    0, 0, 0, 0,                                    // L_THRESH
    ];
    assert_eq!(Request::NewDest(svc(), dest()).encode(FAMILY, 9), expected);
}

#[cfg(target_endian = "little")]
#[test]
fn netmask_layout_differs_by_family() {
    let v4 = Service { netmask: 0xffff_ff00, ..svc() };
    assert!(convert::service_full(&v4).contains(&SvcAttr::Netmask([255, 255, 255, 0])));
    let v6 = Service { netmask: 64, ..Service::new(Protocol::Udp, sa("[fd00::10]:53"), "rr") };
    // The kernel compares an IPv6 "netmask" as a host-order prefix length.
    assert!(convert::service_full(&v6).contains(&SvcAttr::Netmask([64, 0, 0, 0])));
}

#[test]
fn every_request_round_trips() {
    let v6 = Service::new(Protocol::Udp, sa("[fd00::10]:53"), "sh").with_persistence(10800);
    let fwm = Service { flags: IP_VS_SVC_F_SCHED_SH_PORT, ..Service::fwmark(Family::Inet6, 42, "mh") };
    let sctp = Service { netmask: 0xffff_ff00, ..Service::new(Protocol::Sctp, sa("10.0.0.1:9"), "wrr") };
    let tun = Destination {
        forward: Forward::Tunnel,
        tunnel: Some(Tunnel { kind: IP_VS_CONN_F_TUNNEL_TYPE_GUE, port: 6080, flags: IP_VS_TUNNEL_ENCAP_FLAG_CSUM }),
        upper_threshold: 100,
        lower_threshold: 10,
        ..Destination::new(sa("192.168.1.5:80"), 3)
    };
    let d6 = Destination { forward: Forward::Route, ..Destination::new(sa("[fd00::1:2]:8053"), 0) };
    let requests = [
        Request::NewService(svc()),
        Request::NewService(v6.clone()),
        Request::NewService(fwm.clone()),
        Request::SetService(sctp.clone()),
        Request::GetService(v6.clone()),
        Request::DumpServices,
        Request::NewDest(svc(), dest()),
        Request::NewDest(svc(), tun),
        Request::SetDest(v6.clone(), d6.clone()),
        Request::NewDest(fwm.clone(), Destination { forward: Forward::Local, ..dest() }),
        Request::DumpDests(fwm),
        Request::GetConfig,
        Request::SetConfig(Timeouts { tcp: 900, tcp_fin: 120, udp: 300 }),
        Request::Flush,
    ];
    for req in requests {
        assert_eq!(through_wire(&req), keys_only_where_sent(&req), "{req}");
    }
    // Deletes carry only the keys; the settings do not travel and come back as defaults.
    let del = through_wire(&Request::DelService(v6.clone()));
    let Request::DelService(back) = del else { panic!("{del:?}") };
    assert_eq!((back.family, back.protocol, back.socket_addr()), (v6.family, v6.protocol, v6.socket_addr()));
    let del = through_wire(&Request::DelDest(v6.clone(), d6.clone()));
    let Request::DelDest(_, back) = del else { panic!("{del:?}") };
    assert_eq!(back.socket_addr(), d6.socket_addr());
}

/// Only new/set service send the service's settings; other commands identify it by key.
fn keys_only_where_sent(req: &Request) -> Request {
    let key = |s: &Service| Service {
        scheduler: String::new(),
        flags: 0,
        timeout: 0,
        netmask: s.family.full_netmask(),
        ..s.clone()
    };
    match req {
        Request::GetService(s) => Request::GetService(key(s)),
        Request::NewDest(s, d) => Request::NewDest(key(s), d.clone()),
        Request::SetDest(s, d) => Request::SetDest(key(s), d.clone()),
        Request::DumpDests(s) => Request::DumpDests(key(s)),
        r => r.clone(),
    }
}

fn stats(seed: u64) -> Stats {
    Stats {
        conns: seed,
        inpkts: seed + 1,
        outpkts: seed + 2,
        inbytes: 1 << 40,
        outbytes: (1 << 41) + seed,
        cps: 5,
        inpps: 6,
        outpps: 7,
        inbps: 8,
        outbps: 9,
    }
}

fn service_msg(info: &ServiceInfo) -> IpvsMessage {
    IpvsMessage { cmd: IPVS_CMD_NEW_SERVICE, attrs: vec![CmdAttr::Service(convert::service_reply(info))] }
}

fn dest_msg(info: &DestinationInfo) -> IpvsMessage {
    IpvsMessage { cmd: IPVS_CMD_NEW_DEST, attrs: vec![CmdAttr::Dest(convert::dest_reply(info))] }
}

#[test]
fn replies_round_trip_with_stats_and_without_the_hashed_flag() {
    let info = ServiceInfo { service: svc().with_persistence(60), stats: stats(3) };
    let msg = service_msg(&info);
    let attrs = msg.service().unwrap();
    assert!(attrs.iter().any(|a| matches!(a, SvcAttr::Flags { flags, .. } if flags & IP_VS_SVC_F_HASHED != 0)));
    let back = IpvsMessage::decode(&msg.encode(FAMILY, 0, 1)[16..]).unwrap();
    assert_eq!(convert::service_from(back.service().unwrap()).unwrap(), info);

    let dinfo = DestinationInfo { dest: dest(), active_conns: 4, inactive_conns: 5, persist_conns: 6, stats: stats(9) };
    let back = IpvsMessage::decode(&dest_msg(&dinfo).encode(FAMILY, 0, 1)[16..]).unwrap();
    assert_eq!(convert::dest_from(back.dest().unwrap(), Family::Inet).unwrap(), dinfo);
}

/// Found on a real 6.1 kernel: u64 counters come with zero-length IPVS_STATS_ATTR_PAD attributes.
#[cfg(target_endian = "little")]
#[test]
fn stats_with_zero_length_pad_attributes() {
    #[rustfmt::skip]
    let nest: Vec<u8> = vec![
        4, 0, 11, 0,                                  // IPVS_STATS_ATTR_PAD, no value
        12, 0, 1, 0,   3, 0, 0, 0, 0, 0, 0, 0,        // CONNS = 3 (u64)
        4, 0, 11, 0,
        12, 0, 4, 0,   0, 0, 0, 0, 1, 0, 0, 0,        // INBYTES = 1 << 32
    ];
    let mut svc_attrs = Vec::new();
    for a in convert::service_full(&svc()) {
        let mut b = vec![0; netlink_packet_core::Emitable::buffer_len(&a)];
        netlink_packet_core::Emitable::emit(&a, &mut b);
        svc_attrs.extend(b);
    }
    svc_attrs.extend_from_slice(&((4 + nest.len()) as u16).to_ne_bytes());
    svc_attrs.extend_from_slice(&IPVS_SVC_ATTR_STATS64.to_ne_bytes());
    svc_attrs.extend(nest);
    let mut payload = vec![IPVS_CMD_NEW_SERVICE, 1, 0, 0];
    payload.extend_from_slice(&((4 + svc_attrs.len()) as u16).to_ne_bytes());
    payload.extend_from_slice(&IPVS_CMD_ATTR_SERVICE.to_ne_bytes());
    payload.extend(svc_attrs);
    let info = convert::service_from(IpvsMessage::decode(&payload).unwrap().service().unwrap()).unwrap();
    assert_eq!(info.stats, Stats { conns: 3, inbytes: 1 << 32, ..Stats::default() });
    assert_eq!(info.service, svc());
}

#[test]
fn thirty_two_bit_stats_are_read_when_no_stats64() {
    let s = stats(1);
    let mut attrs = convert::service_full(&svc());
    attrs.push(SvcAttr::Stats(s));
    let msg = IpvsMessage { cmd: IPVS_CMD_NEW_SERVICE, attrs: vec![CmdAttr::Service(attrs)] };
    let back = IpvsMessage::decode(&msg.encode(FAMILY, 0, 1)[16..]).unwrap();
    assert_eq!(convert::service_from(back.service().unwrap()).unwrap().stats, s);
}

#[test]
fn destination_without_family_attribute_takes_the_services() {
    let info = DestinationInfo {
        dest: Destination::new(sa("[fd00::7]:80"), 2),
        active_conns: 0,
        inactive_conns: 0,
        persist_conns: 0,
        stats: Stats::default(),
    };
    let attrs: Vec<DestAttr> =
        convert::dest_reply(&info).into_iter().filter(|a| !matches!(a, DestAttr::AddrFamily(_))).collect();
    assert_eq!(convert::dest_from(&attrs, Family::Inet6).unwrap(), info);
}

#[test]
fn unknown_attributes_are_ignored_at_every_level() {
    let info = ServiceInfo { service: svc(), stats: stats(2) };
    let mut attrs = convert::service_reply(&info);
    attrs.insert(2, SvcAttr::Other(DefaultNla::new(99, vec![1, 2, 3])));
    let msg = IpvsMessage {
        cmd: IPVS_CMD_NEW_SERVICE,
        attrs: vec![CmdAttr::Other(DefaultNla::new(200, vec![0xde, 0xad])), CmdAttr::Service(attrs)],
    };
    let back = IpvsMessage::decode(&msg.encode(FAMILY, 0, 1)[16..]).unwrap();
    assert_eq!(convert::service_from(back.service().unwrap()).unwrap(), info);

    let dinfo = DestinationInfo { dest: dest(), active_conns: 1, inactive_conns: 2, persist_conns: 0, stats: stats(4) };
    let mut attrs = convert::dest_reply(&dinfo);
    attrs.push(DestAttr::Other(DefaultNla::new(IPVS_DEST_ATTR_TUN_FLAGS + 1, vec![7; 9])));
    let msg = IpvsMessage { cmd: IPVS_CMD_NEW_DEST, attrs: vec![CmdAttr::Dest(attrs)] };
    let back = IpvsMessage::decode(&msg.encode(FAMILY, 0, 1)[16..]).unwrap();
    assert_eq!(convert::dest_from(back.dest().unwrap(), Family::Inet).unwrap(), dinfo);
}

#[test]
fn truncated_messages_are_decode_errors() {
    let full = kernel_msg(&service_msg(&ServiceInfo { service: svc(), stats: stats(1) }), 1);
    for cut in 1..full.len() {
        assert!(frames(&full[..cut]).is_err(), "prefix of {cut} bytes accepted");
    }
    // A nested attribute whose length runs past its parent.
    let mut bad = Request::NewService(svc()).encode(FAMILY, 1);
    bad[20 + 4] = 200; // first inner attribute (AF) claims 200 bytes
    let Frame::Message { payload, .. } = frames(&bad).unwrap()[0] else { panic!() };
    assert!(matches!(IpvsMessage::decode(payload), Err(DecodeError::Attribute { what: "service", .. })));
    // A u16 attribute with 3 bytes.
    let attrs = vec![SvcAttr::Other(DefaultNla::new(IPVS_SVC_ATTR_AF, vec![2, 0, 0]))];
    let msg = IpvsMessage { cmd: IPVS_CMD_NEW_SERVICE, attrs: vec![CmdAttr::Service(attrs)] };
    assert_eq!(
        IpvsMessage::decode(&msg.encode(FAMILY, 0, 1)[16..]),
        Err(DecodeError::Length { what: "service af", expected: 2, got: 3 })
    );
    assert!(matches!(IpvsMessage::decode(&[1, 1]), Err(DecodeError::Truncated { .. })));
}

#[test]
fn missing_keys_and_bad_values_are_decode_errors() {
    let no_addr: Vec<SvcAttr> =
        convert::service_full(&svc()).into_iter().filter(|a| !matches!(a, SvcAttr::Addr(_))).collect();
    assert_eq!(convert::service_from(&no_addr), Err(DecodeError::Missing("service addr")));
    let bad_af = vec![SvcAttr::Af(99), SvcAttr::Fwmark(1)];
    assert_eq!(convert::service_from(&bad_af), Err(DecodeError::Value { what: "service af", value: 99 }));
    let mut bad_fwd = convert::dest_full(&dest());
    bad_fwd.push(DestAttr::FwdMethod(7));
    assert!(matches!(convert::dest_from(&bad_fwd, Family::Inet), Err(DecodeError::Value { .. })));
}

#[test]
fn garbage_never_panics() {
    // xorshift: deterministic pseudo-random bytes, plus mutations of a valid message.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let valid = kernel_msg(
        &dest_msg(&DestinationInfo {
            dest: dest(),
            active_conns: 1,
            inactive_conns: 1,
            persist_conns: 1,
            stats: stats(1),
        }),
        5,
    );
    for _ in 0..20_000 {
        let mut buf = valid.clone();
        for _ in 0..(next() % 6 + 1) {
            let i = (next() as usize) % buf.len();
            buf[i] = next() as u8;
        }
        if let Ok(fs) = frames(&buf) {
            for f in fs {
                if let Frame::Message { payload, .. } = f
                    && let Ok(m) = IpvsMessage::decode(payload)
                    && let Some(d) = m.dest()
                {
                    let _ = convert::dest_from(d, Family::Inet);
                }
            }
        }
        let len = (next() % 64) as usize;
        let noise: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        let _ = frames(&noise);
        let _ = IpvsMessage::decode(&noise);
    }
}

#[test]
fn dump_spans_datagrams_and_ends_at_done() {
    let infos: Vec<ServiceInfo> = (0..5u16)
        .map(|i| ServiceInfo {
            service: Service::new(Protocol::Tcp, sa(&format!("10.96.0.{i}:80")), "rr"),
            stats: stats(i.into()),
        })
        .collect();
    let msgs: Vec<Vec<u8>> = infos.iter().map(|i| kernel_msg(&service_msg(i), 11)).collect();
    let mut ex = Exchange::new(11, FAMILY, true, IpvsMessage::decode);
    // Datagram 1: two messages plus a stale reply of an older request; datagram 2: three; then DONE.
    let d1 = [msgs[0].clone(), kernel_msg(&service_msg(&infos[4]), 10), msgs[1].clone()].concat();
    let d2 = [msgs[2].clone(), msgs[3].clone(), msgs[4].clone()].concat();
    assert_eq!(ex.feed(&d1), Ok(Progress::More));
    assert_eq!(ex.feed(&d2), Ok(Progress::More));
    assert_eq!(ex.feed(&done(11)), Ok(Progress::Finished));
    let got: Vec<ServiceInfo> =
        ex.into_messages().iter().map(|m| convert::service_from(m.service().unwrap()).unwrap()).collect();
    assert_eq!(got, infos);

    // DONE may also share the datagram with the last messages.
    let mut ex = Exchange::new(12, FAMILY, true, IpvsMessage::decode);
    let last = [kernel_msg(&service_msg(&infos[0]), 12), done(12)].concat();
    assert_eq!(ex.feed(&last), Ok(Progress::Finished));
    assert_eq!(ex.into_messages().len(), 1);
}

#[test]
fn acks_and_kernel_errors() {
    let mut ex = Exchange::new(3, FAMILY, false, IpvsMessage::decode);
    assert_eq!(ex.feed(&error(2, -17)), Ok(Progress::More), "other sequence number ignored");
    assert_eq!(ex.feed(&error(3, 0)), Ok(Progress::Finished));

    let mut ex = Exchange::new(4, FAMILY, false, IpvsMessage::decode);
    assert_eq!(ex.feed(&error(4, -EEXIST)), Err(ReplyError::Kernel(EEXIST)));
    let mut ex = Exchange::new(5, FAMILY, true, IpvsMessage::decode);
    assert_eq!(ex.feed(&nlmsg(3, 5, -ESRCH)), Err(ReplyError::Kernel(ESRCH)), "failed dump");

    let req = Request::NewDest(svc(), dest());
    let err = IpvsError::from_errno(EEXIST, req.to_string());
    assert!(matches!(err, IpvsError::Exists { .. }));
    assert_eq!(err.to_string(), "add destination 10.244.1.2:8080 to TCP 10.96.0.10:80: already exists");
    assert!(matches!(IpvsError::from_errno(ENOENT, String::new()), IpvsError::NotFound { .. }));
    assert!(matches!(IpvsError::from_errno(ESRCH, String::new()), IpvsError::NotFound { .. }));
    assert!(matches!(IpvsError::from_errno(EINVAL, String::new()), IpvsError::Invalid { .. }));
    assert!(matches!(IpvsError::from_errno(1, String::new()), IpvsError::Other { errno: 1, .. }));
}

#[test]
fn descriptions_name_the_objects() {
    let v6 = Service::new(Protocol::Udp, sa("[fd00::10]:53"), "rr");
    assert_eq!(Request::DelService(v6.clone()).to_string(), "delete service UDP [fd00::10]:53");
    assert_eq!(
        Request::DumpDests(Service::fwmark(Family::Inet, 7, "rr")).to_string(),
        "list destinations of FWM 7 IPv4"
    );
    assert_eq!(
        Request::SetDest(v6, Destination::new(sa("[fd00::2]:53"), 0)).to_string(),
        "update destination [fd00::2]:53 of UDP [fd00::10]:53"
    );
}

#[test]
fn family_resolution_messages() {
    let req = encode_get_family(1);
    let f = frames(&req).unwrap();
    let Frame::Message { msg_type, payload, .. } = f[0] else { panic!() };
    assert_eq!(msg_type, GENL_ID_CTRL);
    assert_eq!(payload[0], CTRL_CMD_GETFAMILY);
    assert!(payload.windows(5).any(|w| w == b"IPVS\0"));

    // A controller reply with an attribute this code has never heard of.
    #[rustfmt::skip]
    let reply: Vec<u8> = vec![
        1, 2, 0, 0,                                  // genlmsghdr: CTRL_CMD_NEWFAMILY
        9, 0, 2, 0, b'I', b'P', b'V', b'S', 0, 0, 0, 0, // FAMILY_NAME
        8, 0, 77, 0, 1, 2, 3, 4,                     // unknown
        6, 0, 1, 0, 0x24, 0, 0, 0,                   // FAMILY_ID
    ];
    assert_eq!(decode_family_id(&reply), Ok(0x24));
    assert_eq!(decode_family_id(&reply[..16]), Err(DecodeError::Missing("ctrl family id")));
}

#[test]
fn addresses_decode_from_four_byte_ipv4() {
    let attrs = vec![
        SvcAttr::Af(AF_INET),
        SvcAttr::Protocol(IPPROTO_TCP),
        SvcAttr::Other(DefaultNla::new(IPVS_SVC_ATTR_ADDR, vec![10, 96, 0, 10])),
        SvcAttr::Port(80),
    ];
    let msg = IpvsMessage { cmd: IPVS_CMD_NEW_SERVICE, attrs: vec![CmdAttr::Service(attrs)] };
    let back = IpvsMessage::decode(&msg.encode(FAMILY, 0, 1)[16..]).unwrap();
    let s = convert::service_from(back.service().unwrap()).unwrap().service;
    assert_eq!(s.addr, "10.96.0.10".parse::<IpAddr>().unwrap());
}
