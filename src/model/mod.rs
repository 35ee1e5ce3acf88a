//! The network: its graph, its weights and where they come from.

pub mod graph;

pub use graph::Graph;
