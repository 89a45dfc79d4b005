//! Per-node views (placeholder, being written).
