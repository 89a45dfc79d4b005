//! The client against whatever kernel runs the tests. CI's kernel has no IPVS, so this proves the
//! "module not loaded" path is a typed error; where IPVS exists (UML), it lists the table.

use kpx_ipvs_netlink::{IpvsClient, IpvsError};

#[test]
fn new_is_unavailable_without_ipvs_and_works_with_it() {
    match IpvsClient::new() {
        Err(IpvsError::Unavailable) => {
            eprintln!("IPVS not in this kernel: IpvsClient::new() returned Unavailable, as it should");
        }
        Ok(mut client) => {
            assert_ne!(client.family_id(), 0);
            assert_eq!(client.messages_sent(), 1);
            match client.services() {
                Ok(services) => eprintln!("IPVS present: {} services", services.len()),
                // Listing needs CAP_NET_ADMIN; without it the kernel answers EPERM.
                Err(IpvsError::Other { errno: 1, .. }) => eprintln!("IPVS present, not permitted to list"),
                Err(e) => panic!("listing services: {e:?}"),
            }
        }
        Err(e) => panic!("IpvsClient::new() failed other than Unavailable: {e:?}"),
    }
}
