//! Manifest directory source (placeholder, being written).
