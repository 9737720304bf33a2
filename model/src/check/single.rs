//! The single-chat model (being written).
