//! The process-wide count of encodings kept for sharing (`kpx_controlplane_encoded_cache_bytes`).
//! One test in a binary of its own: the count is global, and other tests would move it.

use kpx_proto::encoded::{CacheAccount, Shared, cached_bytes, field};
use kpx_proto::v1 as pb;

#[test]
fn cached_encodings_are_counted_while_kept_and_released_with_their_owner() {
    let before = cached_bytes();
    let service = Shared::new(pb::Service { namespace: "ns".into(), name: "web".into(), ..Default::default() });
    assert_eq!(cached_bytes(), before, "nothing is encoded before first use");

    let bytes = service.field(field::SERVICES_UPSERTED);
    assert_eq!(cached_bytes(), before + bytes.len() as i64);
    // Asked again: the same kept bytes, counted once.
    let again = service.field(field::SERVICES_UPSERTED);
    assert_eq!(again.as_ptr(), bytes.as_ptr());
    assert_eq!(cached_bytes(), before + bytes.len() as i64);
    // Another tag is encoded afresh and not kept.
    let other = service.field(field::ENDPOINT_GROUPS);
    assert_ne!(other.as_ptr(), bytes.as_ptr());
    assert_eq!(cached_bytes(), before + bytes.len() as i64);

    // The cache lets go of the entry; bytes still on their way to a node do not count.
    drop(service);
    assert_eq!(cached_bytes(), before);
    assert!(!bytes.is_empty());

    let account = CacheAccount::new(1000);
    assert_eq!(cached_bytes(), before + 1000);
    drop(account);
    assert_eq!(cached_bytes(), before);
}
