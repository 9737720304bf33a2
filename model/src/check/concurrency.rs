//! The concurrency model (being written).
