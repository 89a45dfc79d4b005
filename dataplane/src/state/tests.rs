use super::*;

fn svc(name: &str) -> pb::Service {
    pb::Service {
        namespace: "ns".into(),
        name: name.into(),
        cluster_ips: vec!["10.96.0.1".into()],
        ..Default::default()
    }
}

fn ep(service: &str, ip: &str) -> pb::Endpoint {
    pb::Endpoint { service: format!("ns/{service}"), ip: ip.into(), for_cluster: true, ..Default::default() }
}

fn version_of(services: &[pb::Service], endpoints: &[pb::Endpoint]) -> String {
    pb::Update::snapshot(services.to_vec(), endpoints.to_vec()).version
}

fn snapshot(services: Vec<pb::Service>, endpoints: Vec<pb::Endpoint>) -> pb::Update {
    pb::Update::snapshot(services, endpoints)
}

#[test]
fn snapshot_then_delta_reaches_the_announced_version() {
    let mut st = AppliedState::default();
    let snap = snapshot(vec![svc("a"), svc("b")], vec![ep("a", "10.0.0.1"), ep("a", "10.0.0.2")]);
    st.apply(&snap).unwrap();
    assert_eq!(st.version().unwrap().to_version(), snap.version);
    let delta = pb::Update {
        base_version: snap.version.clone(),
        version: version_of(&[svc("a"), svc("b")], &[ep("a", "10.0.0.1"), ep("a", "10.0.0.3")]),
        endpoints_removed: vec![pb::EndpointRef { service: "ns/a".into(), ip: "10.0.0.2".into() }],
        endpoints_upserted: vec![ep("a", "10.0.0.3")],
        ..Default::default()
    };
    let changes = st.apply(&delta).unwrap();
    assert_eq!(changes.services.iter().collect::<Vec<_>>(), ["ns/a"]);
    assert_eq!(st.services()["ns/a"].endpoints.keys().collect::<Vec<_>>(), ["10.0.0.1", "10.0.0.3"]);
}

#[test]
fn service_removal_drops_its_endpoints() {
    let mut st = AppliedState::default();
    let snap = snapshot(vec![svc("a")], vec![ep("a", "10.0.0.1")]);
    st.apply(&snap).unwrap();
    let delta = pb::Update {
        base_version: snap.version.clone(),
        version: ContentHash::EMPTY.to_version(),
        services_removed: vec![pb::ServiceRef { namespace: "ns".into(), name: "a".into() }],
        ..Default::default()
    };
    st.apply(&delta).unwrap();
    assert_eq!(st.endpoint_count(), 0);
    assert_eq!(st.version(), Some(ContentHash::EMPTY));
}

#[test]
fn delta_on_wrong_base_is_refused_without_change() {
    let mut st = AppliedState::default();
    st.apply(&snapshot(vec![svc("a")], vec![])).unwrap();
    let before = st.version();
    let delta = pb::Update { base_version: "f".repeat(32), version: "0".repeat(32), ..Default::default() };
    assert!(matches!(st.apply(&delta), Err(ApplyError::WrongBase { .. })));
    assert_eq!(st.version(), before, "a refused delta leaves the state as it was");
}

#[test]
fn version_mismatch_is_detected() {
    let mut st = AppliedState::default();
    let mut snap = snapshot(vec![svc("a")], vec![ep("a", "10.0.0.1")]);
    snap.version = "1".repeat(32);
    assert!(matches!(st.apply(&snap), Err(ApplyError::VersionMismatch { .. })));
    assert_eq!(st.version(), None);
}

#[test]
fn orphan_endpoint_is_an_error() {
    let mut st = AppliedState::default();
    let snap = snapshot(vec![], vec![ep("a", "10.0.0.1")]);
    assert!(matches!(st.apply(&snap), Err(ApplyError::OrphanEndpoint { .. })));
}

#[test]
fn chunks_are_merged_by_nonce() {
    let mut a = ChunkAssembler::default();
    let c1 = pb::Update { nonce: 1, more: true, endpoints_upserted: vec![ep("a", "10.0.0.1")], ..Default::default() };
    let c2 = pb::Update { nonce: 1, more: false, endpoints_upserted: vec![ep("a", "10.0.0.2")], ..Default::default() };
    assert!(a.push(c1).is_none());
    let whole = a.push(c2).unwrap();
    assert_eq!(whole.endpoints_upserted.len(), 2);
    // A new nonce abandons an unfinished update.
    assert!(a.push(pb::Update { nonce: 2, more: true, ..Default::default() }).is_none());
    let w = a.push(pb::Update { nonce: 3, more: false, ..Default::default() }).unwrap();
    assert_eq!(w.nonce, 3);
}

#[test]
fn grouped_endpoints_are_stored_and_hashed_with_their_service() {
    let flat = snapshot(vec![svc("a"), svc("b")], vec![ep("a", "10.0.0.1"), ep("a", "10.0.0.2"), ep("b", "10.0.0.3")]);
    let bare = |ip: &str| pb::Endpoint { service: String::new(), ..ep("a", ip) };
    let grouped = pb::Update {
        endpoints_upserted: vec![ep("b", "10.0.0.3")],
        endpoint_groups: vec![
            pb::ServiceEndpoints { service: "ns/a".into(), endpoints: vec![bare("10.0.0.1")] },
            pb::ServiceEndpoints { service: "ns/a".into(), endpoints: vec![bare("10.0.0.2")] },
        ],
        ..flat.clone()
    };
    let (mut a, mut b) = (AppliedState::default(), AppliedState::default());
    a.apply(&flat).unwrap();
    let changes = b.apply(&grouped).unwrap();
    assert_eq!(b.version(), a.version(), "same content, same version, however the endpoints travelled");
    assert_eq!(changes.services.iter().collect::<Vec<_>>(), ["ns/a", "ns/b"]);
    assert_eq!(b.services()["ns/a"].endpoints["10.0.0.2"].service, "ns/a");
}

#[test]
fn a_group_holding_another_service_s_endpoint_is_rejected() {
    let mut u = snapshot(vec![svc("a"), svc("b")], vec![ep("a", "10.0.0.1")]);
    u.endpoints_upserted.clear();
    u.endpoint_groups = vec![pb::ServiceEndpoints { service: "ns/b".into(), endpoints: vec![ep("a", "10.0.0.1")] }];
    let err = AppliedState::default().apply(&u).unwrap_err();
    assert_eq!(err, ApplyError::MixedGroup { group: "ns/b".into(), service: "ns/a".into() });
    assert!(err.needs_snapshot());
}

#[test]
fn an_empty_service_can_be_replaced() {
    // Found by tests/hostile_state.rs: an all-empty Service was taken for "no entry yet", so
    // upserting its key again left its hash in the version.
    let empty = pb::Service::default();
    let mut st = AppliedState::default();
    let snap = snapshot(vec![empty.clone()], vec![]);
    st.apply(&snap).unwrap();
    let filled = pb::Service { cluster_ips: vec!["10.96.0.9".into()], ..Default::default() };
    let mut base = snap.version;
    for next in [empty, filled.clone(), pb::Service::default()] {
        let delta = pb::Update {
            base_version: base.clone(),
            version: version_of(std::slice::from_ref(&next), &[]),
            services_upserted: vec![next],
            ..Default::default()
        };
        st.apply(&delta).unwrap();
        base = delta.version;
    }
    assert_eq!(st.services().len(), 1);
}

#[test]
fn a_digest_lists_every_service_sum_in_messages_of_bounded_size() {
    let services: Vec<pb::Service> = (0..20_000).map(|i| svc(&format!("service-with-a-long-name-{i}"))).collect();
    let endpoints: Vec<pb::Endpoint> = (0..20_000)
        .map(|i| ep(&format!("service-with-a-long-name-{i}"), &format!("10.0.{}.{}", i / 250, i % 250)))
        .collect();
    let st = AppliedState::with(services, endpoints).unwrap();
    let digest = st.digest(42);
    assert!(digest.len() > 1, "20,000 services need more than one message");
    assert!(digest.iter().all(|d| d.nonce == 42 && d.encoded_len() <= 80 * 1024));
    assert!(digest[..digest.len() - 1].iter().all(|d| d.more) && !digest.last().unwrap().more);
    let mut total = ContentHash::EMPTY;
    let mut listed = 0;
    for d in &digest {
        assert_eq!(d.version, st.version().unwrap().to_version());
        for s in &d.services {
            total.apply(ContentHash::EMPTY, ContentHash::from_bytes(&s.sum).unwrap());
            listed += 1;
        }
    }
    assert_eq!(listed, 20_000);
    assert_eq!(Some(total), st.version(), "the sums add up to the version");
}

#[test]
fn a_replaced_service_is_removed_and_upserted_in_one_delta() {
    let mut st = AppliedState::with(vec![svc("web")], vec![ep("web", "10.0.0.1"), ep("web", "10.0.0.2")]).unwrap();
    let base = st.version().unwrap().to_version();
    let mut web = svc("web");
    web.cluster_ips = vec!["10.96.0.99".into()];
    let version = version_of(&[web.clone()], &[ep("web", "10.0.0.3")]);
    let delta = pb::Update {
        version,
        base_version: base,
        services_removed: vec![pb::ServiceRef { namespace: "ns".into(), name: "web".into() }],
        services_upserted: vec![web],
        endpoints_upserted: vec![ep("web", "10.0.0.3")],
        ..Default::default()
    };
    let changes = st.apply(&delta).unwrap();
    assert_eq!(changes.services.iter().collect::<Vec<_>>(), ["ns/web"]);
    let eps: Vec<&String> = st.services()["ns/web"].endpoints.keys().collect();
    assert_eq!(eps, ["10.0.0.3"], "the old endpoints went with the removal");
}
