//! The network's parameters by name, checked against the graph.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use super::graph::{Graph, ParamKind};
use crate::rng::SplitMix64;
use crate::{Error, Result, Tensor};

/// Every parameter tensor of a graph, in diffusers' current names, as f32.
///
/// `Default` is the empty set, for a model whose weights now live only in an engine.
#[derive(Clone, Debug, Default)]
pub struct Weights {
    tensors: HashMap<String, Tensor>,
}

/// How many names each list in an error message shows before "and N more".
const LIST: usize = 12;

impl Weights {
    /// Takes the tensors of a checkpoint (`source` names it in messages), renames google's legacy
    /// attention names (`query/key/value/proj_attn`), and checks that the names and shapes are
    /// exactly those of `graph`: missing, unexpected and mis-shaped tensors are all reported.
    pub fn from_tensors(
        graph: &Graph,
        tensors: Vec<(String, Tensor)>,
        source: &Path,
    ) -> Result<Self> {
        let expected: BTreeMap<String, Vec<usize>> =
            graph.params.iter().flat_map(|p| p.tensors()).collect();
        let aliases = legacy_aliases(graph);
        let mut map = HashMap::with_capacity(tensors.len());
        for (name, t) in tensors {
            let name = aliases.get(&name).cloned().unwrap_or(name);
            if map.contains_key(&name) {
                return Err(Error::weights(
                    source,
                    format!(
                        "tensor `{name}` appears twice (under its current and its legacy name)"
                    ),
                ));
            }
            map.insert(name, t);
        }

        let mut missing = Vec::new();
        let mut misshaped = Vec::new();
        for (name, shape) in &expected {
            match map.get_mut(name) {
                None => missing.push(format!("`{name}` {shape:?}")),
                Some(t) if t.shape() == shape.as_slice() => {}
                // Linear layers saved as 1x1 convolutions (`[out, in, 1, 1]`) are the same matrix.
                Some(t) if shape.len() == 2 && t.shape() == [shape[0], shape[1], 1, 1] => {
                    *t = std::mem::replace(t, Tensor::zeros(vec![0])).reshape(shape.clone())?;
                }
                Some(t) => misshaped.push(format!(
                    "`{name}`: expected {shape:?}, found {:?}",
                    t.shape()
                )),
            }
        }
        let mut unexpected: Vec<String> = map
            .iter()
            .filter(|(k, _)| !expected.contains_key(*k))
            .map(|(k, t)| format!("`{k}` {:?}", t.shape()))
            .collect();
        unexpected.sort();
        if missing.is_empty() && misshaped.is_empty() && unexpected.is_empty() {
            for (name, t) in &map {
                if !t.all_finite() {
                    return Err(Error::weights(
                        source,
                        format!("tensor `{name}` holds NaN or infinite values"),
                    ));
                }
            }
            return Ok(Weights { tensors: map });
        }
        let mut msg = String::from("the checkpoint does not match the model configuration");
        for (what, list) in [
            ("mis-shaped", &misshaped),
            ("missing", &missing),
            ("unexpected", &unexpected),
        ] {
            if list.is_empty() {
                continue;
            }
            msg += &format!(
                "\n  {} {what}: {}",
                list.len(),
                list[..list.len().min(LIST)].join(", ")
            );
            if list.len() > LIST {
                msg += &format!(", and {} more", list.len() - LIST);
            }
        }
        Err(Error::weights(source, msg))
    }

    /// Deterministic pseudo-random weights with PyTorch's default initialisation scale
    /// (uniform in ±1/√fan_in; GroupNorm scale 1, shift 0), for benchmarks that need no download.
    pub fn random(graph: &Graph, seed: u64) -> Self {
        let mut rng = SplitMix64::new(seed ^ 0x9E37_79B9_7F4A_7C15);
        let mut uniform = move || (rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0;
        let mut tensors = HashMap::new();
        for p in &graph.params {
            let fan_in = match p.kind {
                ParamKind::Conv { cin, k, .. } => cin * k * k,
                ParamKind::Linear { inp, .. } => inp,
                ParamKind::Qkv { c, .. } => c,
                ParamKind::Norm { .. } => 0,
            };
            for (name, shape) in p.tensors() {
                let n: usize = shape.iter().product();
                let data = if fan_in == 0 {
                    let v = if name.ends_with(".weight") { 1.0 } else { 0.0 };
                    vec![v; n]
                } else {
                    let bound = 1.0 / (fan_in as f32).sqrt();
                    (0..n).map(|_| uniform() * bound).collect()
                };
                tensors.insert(name, Tensor::new(shape, data).expect("shape matches data"));
            }
        }
        Weights { tensors }
    }

    /// The tensor `name`; the graph guarantees every parameter it names exists.
    pub fn get(&self, name: &str) -> &Tensor {
        self.tensors.get(name).unwrap_or_else(|| {
            panic!("weights were validated against the graph, yet `{name}` is absent")
        })
    }

    /// All tensors, for writing a checkpoint.
    pub fn tensors(&self) -> &HashMap<String, Tensor> {
        &self.tensors
    }
}

/// Legacy name -> current name for every attention block of the graph (diffusers 0.1.x wrote
/// `query/key/value/proj_attn`; current diffusers renames them on load).
fn legacy_aliases(graph: &Graph) -> HashMap<String, String> {
    let mut m = HashMap::new();
    for p in &graph.params {
        if let ParamKind::Qkv { .. } = p.kind {
            for (old, new) in [
                ("query", "to_q"),
                ("key", "to_k"),
                ("value", "to_v"),
                ("proj_attn", "to_out.0"),
            ] {
                for s in ["weight", "bias"] {
                    m.insert(
                        format!("{}.{old}.{s}", p.name),
                        format!("{}.{new}.{s}", p.name),
                    );
                }
            }
        }
    }
    m
}
