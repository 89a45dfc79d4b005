//! A directory of Kubernetes manifests as a [`ClusterSource`], for the local demo and tests.
//!
//! Every `*.yaml`, `*.yml` and `*.json` file directly in the directory is read in name order
//! and converted with [`crate::k8s::events_from_manifest`]; the directory is then polled and
//! only differences are published. A file that does not parse keeps the objects it had: an
//! editor saving half a file must not delete services. An object defined in several files is
//! taken from the last one (in name order), as `kubectl apply -f DIR` would leave it.

use crate::k8s::events_from_manifest;
use crate::model::{ClusterEvent, ServiceKey, Skips, SliceKey};
use crate::source::{ClusterSource, SourceError};
use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(1);

pub struct FileSource {
    dir: PathBuf,
    skips: Arc<Skips>,
    poll_interval: Duration,
}

impl FileSource {
    pub fn new(dir: PathBuf, skips: Arc<Skips>) -> Self {
        FileSource { dir, skips, poll_interval: DEFAULT_POLL_INTERVAL }
    }

    /// How often the directory is checked for changes (default 1 s).
    pub fn with_poll_interval(mut self, poll_interval: Duration) -> Self {
        self.poll_interval = poll_interval;
        self
    }
}

impl ClusterSource for FileSource {
    fn run(
        self: Box<Self>,
        events: mpsc::Sender<ClusterEvent>,
    ) -> Pin<Box<dyn Future<Output = Result<(), SourceError>> + Send>> {
        Box::pin(self.watch(events))
    }
}

impl FileSource {
    async fn watch(self, events: mpsc::Sender<ClusterEvent>) -> Result<(), SourceError> {
        let io_error = |source| SourceError::Io { path: self.dir.display().to_string(), source };
        let mut manifests = Manifests::default();
        manifests.refresh(read_dir(&self.dir).await.map_err(io_error)?, &self.skips);
        let mut published = manifests.merged();
        tracing::info!(dir = %self.dir.display(), objects = published.len(), "manifests loaded");
        for event in published.values() {
            send(&events, event.clone()).await?;
        }
        send(&events, ClusterEvent::Synced).await?;

        loop {
            tokio::select! {
                () = tokio::time::sleep(self.poll_interval) => {}
                () = events.closed() => return Err(SourceError::Closed),
            }
            let files = match read_dir(&self.dir).await {
                Ok(files) => files,
                Err(error) => {
                    // Keep serving what we have; the directory may be being replaced.
                    tracing::warn!(dir = %self.dir.display(), %error, "cannot read the manifest directory");
                    continue;
                }
            };
            if !manifests.refresh(files, &self.skips) {
                continue;
            }
            let merged = manifests.merged();
            for event in diff(&published, &merged) {
                send(&events, event).await?;
            }
            published = merged;
        }
    }
}

async fn send(events: &mpsc::Sender<ClusterEvent>, event: ClusterEvent) -> Result<(), SourceError> {
    events.send(event).await.map_err(|_| SourceError::Closed)
}

/// The manifest files in `dir`, sorted by name, with their contents (or why they could not be
/// read). Hidden files (editor locks and swap files) are ignored.
async fn read_dir(dir: &Path) -> io::Result<Vec<(PathBuf, io::Result<Vec<u8>>)>> {
    let mut entries = tokio::fs::read_dir(dir).await?;
    let mut paths = Vec::new();
    while let Some(entry) = entries.next_entry().await? {
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let manifest = path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| ["yaml", "yml", "json"].iter().any(|m| e.eq_ignore_ascii_case(m)));
        // metadata() follows symlinks, as in a mounted ConfigMap.
        let is_file = tokio::fs::metadata(&path).await.is_ok_and(|m| m.is_file());
        if manifest && is_file && !name.starts_with('.') {
            paths.push(path);
        }
    }
    paths.sort();
    let mut files = Vec::with_capacity(paths.len());
    for path in paths {
        let content = tokio::fs::read(&path).await;
        files.push((path, content));
    }
    Ok(files)
}

/// Identity of an object across files.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum ObjectId {
    Node(String),
    Service(ServiceKey),
    Slice(SliceKey),
}

impl ObjectId {
    fn of(event: &ClusterEvent) -> Option<ObjectId> {
        match event {
            ClusterEvent::Node(name, _) => Some(ObjectId::Node(name.clone())),
            ClusterEvent::Service(key, _) | ClusterEvent::NotProxied(key) => Some(ObjectId::Service(key.clone())),
            ClusterEvent::Slice(key, _) => Some(ObjectId::Slice(key.clone())),
            ClusterEvent::Synced => None,
        }
    }

    fn deleted(self) -> ClusterEvent {
        match self {
            ObjectId::Node(name) => ClusterEvent::Node(name, None),
            ObjectId::Service(key) => ClusterEvent::Service(key, None),
            ObjectId::Slice(key) => ClusterEvent::Slice(key, None),
        }
    }
}

fn is_upsert(event: &ClusterEvent) -> bool {
    match event {
        ClusterEvent::Node(_, o) => o.is_some(),
        ClusterEvent::Service(_, o) => o.is_some(),
        ClusterEvent::NotProxied(_) => true,
        ClusterEvent::Slice(_, o) => o.is_some(),
        ClusterEvent::Synced => false,
    }
}

#[derive(Debug)]
struct ManifestFile {
    /// Hash of the content last read, parsed or not: a broken file is reported once.
    hash: u64,
    /// The events of the last content that parsed.
    events: Vec<ClusterEvent>,
}

/// The files of the directory as last read.
#[derive(Debug, Default)]
struct Manifests {
    files: BTreeMap<PathBuf, ManifestFile>,
}

impl Manifests {
    /// Takes a fresh read of the directory. Returns whether anything may have changed.
    fn refresh(&mut self, files: Vec<(PathBuf, io::Result<Vec<u8>>)>, skips: &Skips) -> bool {
        let mut changed = false;
        let mut present = BTreeSet::new();
        for (path, content) in files {
            let content = match content {
                Ok(content) => content,
                // Deleted between listing and reading: gone.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(error) => {
                    tracing::warn!(file = %path.display(), %error, "cannot read manifest; keeping its previous objects");
                    present.insert(path);
                    continue;
                }
            };
            let hash = content_hash(&content);
            let previous = self.files.get(&path);
            if previous.is_none_or(|f| f.hash != hash) {
                changed = true;
                let events = match parse(&path, &content, skips) {
                    Some(events) => events,
                    None => previous.map(|f| f.events.clone()).unwrap_or_default(),
                };
                self.files.insert(path.clone(), ManifestFile { hash, events });
            }
            present.insert(path);
        }
        let before = self.files.len();
        self.files.retain(|path, _| present.contains(path));
        changed || self.files.len() != before
    }

    /// Every object defined by the files, the last file (in name order) winning.
    fn merged(&self) -> BTreeMap<ObjectId, ClusterEvent> {
        let mut merged: BTreeMap<ObjectId, (&Path, &ClusterEvent)> = BTreeMap::new();
        for (path, file) in &self.files {
            for event in &file.events {
                let Some(id) = ObjectId::of(event) else { continue };
                if let Some((earlier, _)) = merged.insert(id.clone(), (path, event)) {
                    tracing::warn!(
                        object = ?id,
                        earlier = %earlier.display(),
                        file = %path.display(),
                        "object defined more than once; the later definition wins"
                    );
                }
            }
        }
        merged.into_iter().filter(|(_, (_, e))| is_upsert(e)).map(|(id, (_, e))| (id, e.clone())).collect()
    }
}

fn parse(path: &Path, content: &[u8], skips: &Skips) -> Option<Vec<ClusterEvent>> {
    let text = match std::str::from_utf8(content) {
        Ok(text) => text,
        Err(error) => {
            tracing::warn!(file = %path.display(), %error, "manifest is not UTF-8; keeping its previous objects");
            return None;
        }
    };
    match events_from_manifest(text, skips) {
        Ok(events) => Some(events),
        Err(error) => {
            tracing::warn!(file = %path.display(), %error, "cannot parse manifest; keeping its previous objects");
            None
        }
    }
}

fn content_hash(content: &[u8]) -> u64 {
    let mut hasher = std::hash::DefaultHasher::new();
    content.hash(&mut hasher);
    hasher.finish()
}

/// The events that turn `old` into `new`: deletions, then upserts of new or changed objects.
fn diff(old: &BTreeMap<ObjectId, ClusterEvent>, new: &BTreeMap<ObjectId, ClusterEvent>) -> Vec<ClusterEvent> {
    let deleted = old.keys().filter(|id| !new.contains_key(*id)).map(|id| id.clone().deleted());
    let upserted = new.iter().filter(|(id, e)| old.get(*id) != Some(*e)).map(|(_, e)| e.clone());
    deleted.chain(upserted).collect()
}
