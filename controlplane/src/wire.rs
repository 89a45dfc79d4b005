//! model -> wire conversion (placeholder, being written).
