//! The kube-proxy v1.28.7 conformance cases (tests/testdata/kube-proxy-1.28.7, see its README):
//! small clusters that went through a real apiserver, with the rules the real kube-proxy wrote
//! for them. Each case's cluster goes through the controlplane's own manifest loader and cache,
//! so the state a test renders is exactly what node-1's dataplane would receive.

#![allow(dead_code)] // each test file uses a different part

use std::path::PathBuf;
use std::sync::Arc;

use kpx_controlplane::cache::{Cache, CacheConfig};
use kpx_controlplane::k8s;
use kpx_controlplane::model::{ClusterEvent, Skips};
use kpx_dataplane::backend::iptables::render::{IpFamily, RenderConfig};
use kpx_dataplane::state::AppliedState;

/// How many cases the data set holds: a test that found fewer would prove less than it says.
pub const CASE_COUNT: usize = 16;

pub struct Case {
    pub name: String,
    pub dir: PathBuf,
}

/// Every case, in name order.
pub fn cases() -> Vec<Case> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/testdata/kube-proxy-1.28.7");
    let mut out: Vec<Case> = std::fs::read_dir(&root)
        .unwrap_or_else(|e| panic!("{}: {e}", root.display()))
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.join("cluster.yaml").is_file())
        .map(|dir| Case { name: dir.file_name().unwrap().to_string_lossy().into_owned(), dir })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    assert_eq!(out.len(), CASE_COUNT, "cases in {}", root.display());
    out
}

impl Case {
    pub fn read(&self, file: &str) -> String {
        let path = self.dir.join(file);
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    /// kube-proxy's flag VALUE of `--NAME VALUE` in kube-proxy-flags.txt.
    pub fn flag(&self, name: &str) -> Option<String> {
        let flags = self.read("kube-proxy-flags.txt");
        let words: Vec<&str> = flags.split_whitespace().collect();
        words.windows(2).find(|w| w[0] == format!("--{name}")).map(|w| w[1].to_string())
    }

    /// The node kube-proxy ran as.
    pub fn node(&self) -> String {
        self.flag("hostname-override").expect("--hostname-override")
    }

    /// The desired state of the case's node, as the controlplane computes it.
    pub fn state(&self) -> AppliedState {
        let skips = Arc::new(Skips::default());
        let cache = Cache::new(skips.clone(), CacheConfig::default());
        let events = k8s::events_from_manifest(&self.read("cluster.yaml"), &skips)
            .unwrap_or_else(|e| panic!("{}: {e}", self.name));
        for event in events {
            cache.apply(event, None);
        }
        cache.apply(ClusterEvent::Synced, None);
        assert_eq!(skips.total(), 0, "{}: the apiserver's objects are all valid: {:?}", self.name, skips.snapshot());
        let node_state = cache.node_state(&self.node()).unwrap_or_else(|e| panic!("{}: {e}", self.name));
        let mut services = Vec::new();
        let mut endpoints = Vec::new();
        for s in node_state.services {
            services.extend(s.service);
            endpoints.extend(s.endpoints);
        }
        AppliedState::with(services, endpoints).unwrap_or_else(|e| panic!("{}: {e}", self.name))
    }

    /// kpx's render settings equivalent to the flags kube-proxy ran with (IPv4; node ports on
    /// every local address; localhost node ports on, kube-proxy's default).
    pub fn render_config(&self) -> RenderConfig {
        RenderConfig {
            family: IpFamily::V4,
            cluster_cidr: self.flag("cluster-cidr"),
            masquerade_all: false,
            node_ips: Vec::new(),
            node_name: self.node(),
            localhost_node_ports: true,
        }
    }
}
