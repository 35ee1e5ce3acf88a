//! The network: its graph, its weights and where they come from.

pub mod graph;
pub mod load;
pub mod weights;

pub use graph::Graph;
pub use load::{Model, ModelFiles};
pub use weights::Weights;
