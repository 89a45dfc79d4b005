//! apiserver watchers (placeholder, being written).
