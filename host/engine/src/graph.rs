//! ONNX graphs for the three pieces of a forward pass — embedding, one block,
//! head — built with ONNX Runtime's model-editor API from an [`Arch`].
//!
//! Weights are graph *inputs*, not initializers: a session holds no weights,
//! so one block session serves every block with the same set of tensors, the
//! host can run blocks in any order, and each run borrows the weights straight
//! from the checkpoint's mapping (ONNX Runtime reads CPU inputs in place).
//! Only a handful of shape constants are initializers.

use std::collections::{BTreeMap, HashSet};

use ort::editor::{Graph, Model, Node, Opset, ONNX_DOMAIN};
use ort::memory::Allocator;
use ort::operator::Attribute;
use ort::value::{Outlet, Shape, SymbolicDimensions, Tensor, TensorElementType, ValueType};

use probe_store::arch::{Activation, Arch, Layout, Norm};

/// ONNX opset the graphs are written against (Gelu with `approximate` needs 20).
const OPSET: u32 = 21;

/// Names of the values the graphs exchange with the host.
pub mod io {
    pub const IDS: &str = "ids";
    pub const POSITIONS: &str = "positions";
    pub const TYPE_IDS: &str = "type_ids";
    pub const RESIDUAL: &str = "x";
    pub const COS: &str = "cos";
    pub const SIN: &str = "sin";
    pub const MASK: &str = "mask";
    pub const OUT: &str = "y";
    pub const ATTN_UPDATE: &str = "attn_update";
    pub const MLP_UPDATE: &str = "mlp_update";
    pub const ATTN_PROBS: &str = "attn_probs";
    /// Keys after rotation and values, `[B, kv_heads, S, head_dim]`: what a
    /// key/value cache keeps of a block (outputs; the step graph's are the
    /// cached rows followed by the new ones).
    pub const KEYS: &str = "keys";
    pub const VALUES: &str = "values";
    /// The step graph's cached keys and values, `[B, kv_heads, P, head_dim]`.
    pub const PAST_KEYS: &str = "past_keys";
    pub const PAST_VALUES: &str = "past_values";
    pub const LOGITS: &str = "logits";
    /// Every head's output before the output projection, `[B·T, heads ×
    /// head_dim]` (TransformerLens's `hook_z`), head after head.
    pub const Z: &str = "z";
    /// The patched graph's hooks: each point's value becomes `value × keep +
    /// add` (keep 1 and add 0 leave it; keep 0 replaces it by add), per
    /// element: `z` `[B·T, heads × head_dim]`, the attention and MLP updates
    /// `[B·T, hidden]`.
    pub const Z_KEEP: &str = "z_keep";
    pub const Z_ADD: &str = "z_add";
    pub const ATTN_KEEP: &str = "attn_keep";
    pub const ATTN_ADD: &str = "attn_add";
    pub const MLP_KEEP: &str = "mlp_keep";
    pub const MLP_ADD: &str = "mlp_add";
    /// The hook inputs in the order `hook_inputs` makes them.
    pub const HOOKS: [&str; 6] = [Z_KEEP, Z_ADD, ATTN_KEEP, ATTN_ADD, MLP_KEEP, MLP_ADD];
}

type Result<T> = std::result::Result<T, ort::Error>;

/// A graph under construction: unique value names and the declared inputs.
struct Builder {
    graph: Graph,
    next: usize,
    inputs: Vec<Outlet>,
    /// Every value some node reads: a graph keeps only the inputs a node
    /// reads, so a sublayer's graph asks for that sublayer's weights alone
    /// (and the MLP's for no mask or rotation).
    read: HashSet<String>,
}

fn tensor_type(ty: TensorElementType, dims: &[i64], symbols: &[&str]) -> ValueType {
    ValueType::Tensor {
        ty,
        shape: Shape::new(dims.iter().copied()),
        dimension_symbols: SymbolicDimensions::new(symbols.iter().map(|s| s.to_string())),
    }
}

impl Builder {
    fn new() -> Result<Self> {
        Ok(Builder {
            graph: Graph::new()?,
            next: 0,
            inputs: Vec::new(),
            read: HashSet::new(),
        })
    }

    /// Declare an input; `-1` dimensions are the sequence length `T`.
    fn input(&mut self, name: &str, ty: TensorElementType, dims: &[i64]) {
        let symbols: Vec<&str> = dims.iter().map(|&d| if d < 0 { "T" } else { "" }).collect();
        self.inputs
            .push(Outlet::new(name, tensor_type(ty, dims, &symbols)));
    }

    fn fresh(&mut self, op: &str) -> String {
        self.next += 1;
        format!("{}_{}", op.to_ascii_lowercase(), self.next)
    }

    /// One node with one output, named `output` or a fresh name.
    fn op_named(
        &mut self,
        op: &str,
        inputs: &[&str],
        attributes: Vec<Attribute>,
        output: Option<&str>,
    ) -> Result<String> {
        let out = output.map_or_else(|| self.fresh(op), str::to_string);
        let node_name = format!("node_{out}");
        self.read.extend(inputs.iter().map(|i| i.to_string()));
        self.graph.add_node(Node::new(
            op,
            ONNX_DOMAIN,
            node_name,
            inputs,
            [out.as_str()],
            attributes,
        )?)?;
        Ok(out)
    }

    fn op(&mut self, op: &str, inputs: &[&str], attributes: Vec<Attribute>) -> Result<String> {
        self.op_named(op, inputs, attributes, None)
    }

    fn op_multi(
        &mut self,
        op: &str,
        inputs: &[&str],
        outputs: usize,
        attributes: Vec<Attribute>,
    ) -> Result<Vec<String>> {
        let names: Vec<String> = (0..outputs).map(|_| self.fresh(op)).collect();
        let node_name = format!("node_{}", names[0]);
        self.read.extend(inputs.iter().map(|i| i.to_string()));
        self.graph.add_node(Node::new(
            op,
            ONNX_DOMAIN,
            node_name,
            inputs,
            &names,
            attributes,
        )?)?;
        Ok(names)
    }

    fn const_i64(&mut self, values: &[i64]) -> Result<String> {
        let name = self.fresh("const");
        let mut tensor = Tensor::<i64>::new(&Allocator::default(), [values.len()])?;
        tensor.extract_tensor_mut().1.copy_from_slice(values);
        self.graph.add_initializer(&name, tensor, false)?;
        Ok(name)
    }

    fn const_f32(&mut self, value: f32) -> Result<String> {
        let name = self.fresh("const");
        let mut tensor = Tensor::<f32>::new(&Allocator::default(), Vec::<i64>::new())?;
        tensor.extract_tensor_mut().1[0] = value;
        self.graph.add_initializer(&name, tensor, false)?;
        Ok(name)
    }

    fn finish(mut self, outputs: &[(&str, usize)]) -> Result<Model> {
        let inputs: Vec<Outlet> = std::mem::take(&mut self.inputs)
            .into_iter()
            .filter(|i| self.read.contains(i.name()))
            .collect();
        self.graph.set_inputs(inputs)?;
        let outputs = outputs.iter().map(|&(name, rank)| {
            let dims = vec![-1i64; rank];
            let symbols: Vec<String> = (0..rank).map(|i| format!("{name}_{i}")).collect();
            Outlet::new(
                name,
                ValueType::Tensor {
                    ty: TensorElementType::Float32,
                    shape: Shape::new(dims),
                    dimension_symbols: SymbolicDimensions::new(symbols),
                },
            )
        });
        self.graph.set_outputs(outputs)?;
        let mut model = Model::new([Opset::new(ONNX_DOMAIN, OPSET)?])?;
        model.set_graph(self.graph)?;
        Ok(model)
    }

    // --- layers -------------------------------------------------------------

    /// `x × keep + add`, elementwise: a hook point of the patched graph.
    fn hooked(&mut self, x: &str, keep: &str, add: &str) -> Result<String> {
        let kept = self.op("Mul", &[x, keep], vec![])?;
        self.op("Add", &[&kept, add], vec![])
    }

    /// `x·Wᵀ + b` for a Linear weight `[out, in]`; `x·W + b` for GPT-2's
    /// Conv1D `[in, out]` (`transposed`).
    fn linear(
        &mut self,
        x: &str,
        weight: &str,
        bias: Option<&str>,
        transposed: bool,
    ) -> Result<String> {
        let mut inputs = vec![x, weight];
        inputs.extend(bias);
        let trans_b = if transposed { 0 } else { 1 };
        self.op(
            "Gemm",
            &inputs,
            vec![Attribute::new("transB", trans_b as i64)?],
        )
    }

    fn norm(&mut self, norm: Norm, x: &str, weight: &str, bias: Option<&str>) -> Result<String> {
        match norm {
            Norm::Rms { eps, plus_one } => {
                let squared = self.op("Mul", &[x, x], vec![])?;
                let axes = self.const_i64(&[-1])?;
                let mean = self.op(
                    "ReduceMean",
                    &[&squared, &axes],
                    vec![Attribute::new("keepdims", 1i64)?],
                )?;
                let eps = self.const_f32(eps)?;
                let shifted = self.op("Add", &[&mean, &eps], vec![])?;
                let root = self.op("Sqrt", &[&shifted], vec![])?;
                let normed = self.op("Div", &[x, &root], vec![])?;
                let gain = if plus_one {
                    let one = self.const_f32(1.0)?;
                    self.op("Add", &[weight, &one], vec![])?
                } else {
                    weight.to_string()
                };
                self.op("Mul", &[&normed, &gain], vec![])
            }
            Norm::Layer { eps } => {
                let mut inputs = vec![x, weight];
                inputs.extend(bias);
                self.op(
                    "LayerNormalization",
                    &inputs,
                    vec![
                        Attribute::new("axis", -1i64)?,
                        Attribute::new("epsilon", eps)?,
                    ],
                )
            }
        }
    }

    fn activation(&mut self, activation: Activation, x: &str) -> Result<String> {
        match activation {
            Activation::Silu => {
                let gate = self.op("Sigmoid", &[x], vec![])?;
                self.op("Mul", &[x, &gate], vec![])
            }
            Activation::GeluTanh => self.op(
                "Gelu",
                &[x],
                vec![Attribute::new("approximate", "tanh".to_string())?],
            ),
            Activation::GeluErf => self.op(
                "Gelu",
                &[x],
                vec![Attribute::new("approximate", "none".to_string())?],
            ),
        }
    }

    /// Rotary embedding on `[B, heads, T, head_dim]` with `cos`/`sin` `[T, head_dim]`.
    fn rope(&mut self, x: &str, head_dim: usize) -> Result<String> {
        let half = (head_dim / 2) as i64;
        let split = self.const_i64(&[half, half])?;
        let halves = self.op_multi(
            "Split",
            &[x, &split],
            2,
            vec![Attribute::new("axis", -1i64)?],
        )?;
        let negated = self.op("Neg", &[&halves[1]], vec![])?;
        let rotated = self.op(
            "Concat",
            &[&negated, &halves[0]],
            vec![Attribute::new("axis", -1i64)?],
        )?;
        let a = self.op("Mul", &[x, io::COS], vec![])?;
        let b = self.op("Mul", &[&rotated, io::SIN], vec![])?;
        self.op("Add", &[&a, &b], vec![])
    }
}

/// The tensors a graph reads, by input name, with their shapes.
pub type WeightShapes = BTreeMap<&'static str, Vec<usize>>;

/// Declare the weights as inputs (like every input, those no node reads
/// are dropped when the graph is finished). `open_first` leaves the first axis open
/// (`-1`) for the tensors it names: the embedding table and the
/// unembedding take any rows (a run's tokens, a vocabulary tile).
fn declare_weights(b: &mut Builder, weights: &WeightShapes, open_first: &[&str]) {
    for (name, shape) in weights {
        let mut dims: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
        if open_first.contains(name) {
            dims[0] = -1;
        }
        b.input(name, TensorElementType::Float32, &dims);
    }
}

/// The embedding graph: ids (and positions, token types) → residual `[T, hidden]`.
pub fn embedding(arch: &Arch, weights: &WeightShapes) -> Result<Model> {
    let mut b = Builder::new()?;
    b.input(io::IDS, TensorElementType::Int64, &[-1]);
    let has = |n: &str| weights.contains_key(n);
    if has("pos_embed.weight") {
        b.input(io::POSITIONS, TensorElementType::Int64, &[-1]);
    }
    if has("type_embed.weight") {
        b.input(io::TYPE_IDS, TensorElementType::Int64, &[-1]);
    }
    // The table's rows are the run's own tokens, gathered by the engine.
    declare_weights(&mut b, weights, &["embed.weight"]);
    let mut x = b.op(
        "Gather",
        &["embed.weight", io::IDS],
        vec![Attribute::new("axis", 0i64)?],
    )?;
    if let Some(scale) = arch.embed_scale {
        let scale = b.const_f32(scale)?;
        x = b.op("Mul", &[&x, &scale], vec![])?;
    }
    if has("pos_embed.weight") {
        let pos = b.op(
            "Gather",
            &["pos_embed.weight", io::POSITIONS],
            vec![Attribute::new("axis", 0i64)?],
        )?;
        x = b.op("Add", &[&x, &pos], vec![])?;
    }
    if has("type_embed.weight") {
        let types = b.op(
            "Gather",
            &["type_embed.weight", io::TYPE_IDS],
            vec![Attribute::new("axis", 0i64)?],
        )?;
        x = b.op("Add", &[&x, &types], vec![])?;
    }
    if has("embed_norm.weight") {
        let bias = has("embed_norm.bias").then_some("embed_norm.bias");
        x = b.norm(arch.norm, &x, "embed_norm.weight", bias)?;
    }
    b.op_named("Identity", &[&x], vec![], Some(io::OUT))?;
    b.finish(&[(io::OUT, 2)])
}

/// Which block graph to build.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BlockGraphKind {
    /// Whole sequences: `cos`/`sin` `[T, head_dim]` and a `[T, T]` mask
    /// shared by the B sequences.
    Whole,
    /// New rows after cached ones (a key/value cache): B sequences of T new
    /// rows each, with every sequence's `P` cached keys and values as inputs
    /// (`past_keys`/`past_values`), its own positions (`cos`/`sin`
    /// `[B, 1, T, head_dim]`) and its own mask `[B, 1, T, P + T]` (a shorter
    /// sequence's cache is padded with columns its mask hides).
    Step,
    /// The attention sublayer alone, as [`BlockGraphKind::Whole`] lays out
    /// its inputs: `y` is the residual after attention (the block's
    /// midpoint), the MLP never runs.
    Attention,
    /// The MLP sublayer alone on a residual taken as the block's midpoint:
    /// `y` is the residual after the MLP. Its inputs are the residual and
    /// the MLP's weights only (no mask, no rotation), so it follows either
    /// attention graph, a whole sequence's or a step's.
    Mlp,
    /// The whole block with its hooks open: `z`, the attention update and
    /// the MLP update each become `value × keep + add` from inputs
    /// ([`io::Z_KEEP`] …) — activation patching and steering inside a block.
    Patched,
    /// [`BlockGraphKind::Step`] with the hooks of [`BlockGraphKind::Patched`]:
    /// an edit inside a block on rows that run after cached ones.
    PatchedStep,
    /// The attention sublayer of [`BlockGraphKind::Step`] alone: with
    /// [`BlockGraphKind::Mlp`] after it, a step through a block whose
    /// weights do not fit the memory budget at once.
    AttentionStep,
}

/// One transformer block: residual in, residual out, plus each sublayer's
/// update, the attention probabilities `[B, heads, T, S]` and the keys and
/// values a cache keeps. The residual `[B·T, hidden]` holds B sequences of T
/// tokens (T from the mask). `S` is T for [`BlockGraphKind::Whole`], P + T
/// for [`BlockGraphKind::Step`]. [`BlockGraphKind::Attention`] and
/// [`BlockGraphKind::Mlp`] are one sublayer of it, with only that
/// sublayer's outputs.
pub fn block(arch: &Arch, weights: &WeightShapes, kind: BlockGraphKind) -> Result<Model> {
    let step = matches!(
        kind,
        BlockGraphKind::Step | BlockGraphKind::PatchedStep | BlockGraphKind::AttentionStep
    );
    let attention_runs = kind != BlockGraphKind::Mlp;
    let mlp_runs = !matches!(
        kind,
        BlockGraphKind::Attention | BlockGraphKind::AttentionStep
    );
    let patched = matches!(kind, BlockGraphKind::Patched | BlockGraphKind::PatchedStep);
    let mut b = Builder::new()?;
    let (kv, dh) = (arch.kv_heads as i64, arch.head_dim as i64);
    b.input(
        io::RESIDUAL,
        TensorElementType::Float32,
        &[-1, arch.hidden as i64],
    );
    let rotary = !arch.ropes.is_empty();
    if rotary {
        let dims: &[i64] = if step { &[-1, 1, -1, dh] } else { &[-1, dh] };
        b.input(io::COS, TensorElementType::Float32, dims);
        b.input(io::SIN, TensorElementType::Float32, dims);
    }
    // Additive mask: 0 where a query may look, −∞ where not.
    let mask_dims: &[i64] = if step { &[-1, 1, -1, -1] } else { &[-1, -1] };
    b.input(io::MASK, TensorElementType::Float32, mask_dims);
    if step {
        b.input(io::PAST_KEYS, TensorElementType::Float32, &[-1, kv, -1, dh]);
        b.input(
            io::PAST_VALUES,
            TensorElementType::Float32,
            &[-1, kv, -1, dh],
        );
    }
    if patched {
        let z = (arch.heads * arch.head_dim) as i64;
        let d = arch.hidden as i64;
        for (name, width) in io::HOOKS.into_iter().zip([z, z, d, d, d, d]) {
            b.input(name, TensorElementType::Float32, &[-1, width]);
        }
    }
    declare_weights(&mut b, weights, &[]);
    let has = |n: &str| weights.contains_key(n);
    let opt = |n: &'static str| has(n).then_some(n);

    let norm = |b: &mut Builder, x: &str, prefix: &str| sublayer_norm(b, arch, weights, x, prefix);

    // --- attention ---
    let x = io::RESIDUAL;
    let x1 = if attention_runs {
        attention_sublayer(&mut b, arch, weights, step, patched)?
    } else {
        x.to_string()
    };
    if !mlp_runs {
        b.op_named("Identity", &[&x1], vec![], Some(io::OUT))?;
        return b.finish(&[
            (io::OUT, 2),
            (io::ATTN_UPDATE, 2),
            (io::ATTN_PROBS, 4),
            (io::KEYS, 4),
            (io::VALUES, 4),
            (io::Z, 2),
        ]);
    }

    // --- MLP ---
    let transposed = has("qkv.weight"); // GPT-2 stores every projection as Conv1D
    let mlp_in = if arch.layout == Layout::PostNorm {
        x1.clone()
    } else {
        norm(&mut b, &x1, "mlp_norm")?
    };
    let hidden = if arch.gated_mlp {
        let gate = b.linear(&mlp_in, "gate.weight", opt("gate.bias"), false)?;
        let up = b.linear(&mlp_in, "up.weight", opt("up.bias"), false)?;
        let gate = b.activation(arch.activation, &gate)?;
        b.op("Mul", &[&gate, &up], vec![])?
    } else {
        let up = b.linear(&mlp_in, "up.weight", opt("up.bias"), transposed)?;
        b.activation(arch.activation, &up)?
    };
    let mut mlp = b.linear(&hidden, "down.weight", opt("down.bias"), transposed)?;
    if arch.layout == Layout::Sandwich {
        mlp = norm(&mut b, &mlp, "post_mlp_norm")?;
    }
    if patched {
        mlp = b.hooked(&mlp, io::MLP_KEEP, io::MLP_ADD)?;
    }
    let mlp = b.op_named("Identity", &[&mlp], vec![], Some(io::MLP_UPDATE))?;
    if arch.layout == Layout::PostNorm {
        let sum = b.op("Add", &[&x1, &mlp], vec![])?;
        let weight = "post_mlp_norm.weight";
        let bias = opt("post_mlp_norm.bias");
        let out = b.norm(arch.norm, &sum, weight, bias)?;
        b.op_named("Identity", &[&out], vec![], Some(io::OUT))?;
    } else {
        b.op_named("Add", &[&x1, &mlp], vec![], Some(io::OUT))?;
    }
    if !attention_runs {
        return b.finish(&[(io::OUT, 2), (io::MLP_UPDATE, 2)]);
    }
    b.finish(&[
        (io::OUT, 2),
        (io::ATTN_UPDATE, 2),
        (io::MLP_UPDATE, 2),
        (io::ATTN_PROBS, 4),
        (io::KEYS, 4),
        (io::VALUES, 4),
        (io::Z, 2),
    ])
}

/// The attention half of a block on the residual input `x`: norms,
/// projections, attention, output projection; its update (`attn_update`),
/// probabilities, keys and values are named outputs. The residual after it
/// (the block's midpoint) is returned.
fn attention_sublayer(
    b: &mut Builder,
    arch: &Arch,
    weights: &WeightShapes,
    step: bool,
    patched: bool,
) -> Result<String> {
    let (h, kv, dh) = (
        arch.heads as i64,
        arch.kv_heads as i64,
        arch.head_dim as i64,
    );
    let rotary = !arch.ropes.is_empty();
    let has = |n: &str| weights.contains_key(n);
    let opt = |n: &'static str| has(n).then_some(n);
    let norm = |b: &mut Builder, x: &str, prefix: &str| sublayer_norm(b, arch, weights, x, prefix);

    let x = io::RESIDUAL;
    let attn_in = if arch.layout == Layout::PostNorm {
        x.to_string()
    } else {
        norm(b, x, "attn_norm")?
    };
    let (q, k, v) = if has("qkv.weight") {
        let fused = b.linear(&attn_in, "qkv.weight", opt("qkv.bias"), true)?;
        let d = arch.hidden as i64;
        let split = b.const_i64(&[d, d, d])?;
        let parts = b.op_multi(
            "Split",
            &[&fused, &split],
            3,
            vec![Attribute::new("axis", 1i64)?],
        )?;
        (parts[0].clone(), parts[1].clone(), parts[2].clone())
    } else {
        (
            b.linear(&attn_in, "q.weight", opt("q.bias"), false)?,
            b.linear(&attn_in, "k.weight", opt("k.bias"), false)?,
            b.linear(&attn_in, "v.weight", opt("v.bias"), false)?,
        )
    };
    // The residual holds B sequences of T tokens stacked along its first
    // axis ([B·T, hidden]; T is the mask's side). Projections and the MLP see
    // one [B·T, ·] matrix; attention runs per sequence.
    let query_axis = if step { 2i64 } else { 0 };
    let t = b.op(
        "Shape",
        &[io::MASK],
        vec![
            Attribute::new("start", query_axis)?,
            Attribute::new("end", query_axis + 1)?,
        ],
    )?;
    let per_head_q = b.const_i64(&[0, h, dh])?;
    let per_head_kv = b.const_i64(&[0, kv, dh])?;
    let mut q = b.op("Reshape", &[&q, &per_head_q], vec![])?;
    let mut k = b.op("Reshape", &[&k, &per_head_kv], vec![])?;
    let v = b.op("Reshape", &[&v, &per_head_kv], vec![])?;
    let qk_norm = Norm::Rms {
        eps: match arch.norm {
            Norm::Rms { eps, .. } | Norm::Layer { eps } => eps,
        },
        plus_one: matches!(arch.norm, Norm::Rms { plus_one: true, .. }),
    };
    if has("q_norm.weight") {
        q = b.norm(qk_norm, &q, "q_norm.weight", None)?;
    }
    if has("k_norm.weight") {
        k = b.norm(qk_norm, &k, "k_norm.weight", None)?;
    }
    // [B·T, heads, dh] → [B, heads, T, dh].
    let by_sequence = |b: &mut Builder, x: &str, heads: i64| -> Result<String> {
        let minus_one = b.const_i64(&[-1])?;
        let per_head = b.const_i64(&[heads, dh])?;
        let shape = b.op(
            "Concat",
            &[&minus_one, &t, &per_head],
            vec![Attribute::new("axis", 0i64)?],
        )?;
        let x = b.op("Reshape", &[x, &shape], vec![])?;
        b.op(
            "Transpose",
            &[&x],
            vec![Attribute::new("perm", vec![0i64, 2, 1, 3])?],
        )
    };
    let mut q = by_sequence(b, &q, h)?;
    let mut k = by_sequence(b, &k, kv)?;
    let v = by_sequence(b, &v, kv)?;
    if rotary {
        q = b.rope(&q, arch.head_dim)?;
        k = b.rope(&k, arch.head_dim)?;
    }
    // The cache's rows come first: keys (already rotated) and values of
    // every earlier position, then the new rows'.
    let (k, v) = if step {
        let axis = || Attribute::new("axis", 2i64);
        (
            b.op("Concat", &[io::PAST_KEYS, &k], vec![axis()?])?,
            b.op("Concat", &[io::PAST_VALUES, &v], vec![axis()?])?,
        )
    } else {
        (k, v)
    };
    let k = b.op_named("Identity", &[&k], vec![], Some(io::KEYS))?;
    let v = b.op_named("Identity", &[&v], vec![], Some(io::VALUES))?;
    // Grouped-query attention without copying keys: the query heads that share
    // a key/value head are stacked along the sequence axis.
    let grouped = b.const_i64(&[0, kv, -1, dh])?;
    let q = b.op("Reshape", &[&q, &grouped], vec![])?;
    let k_t = b.op(
        "Transpose",
        &[&k],
        vec![Attribute::new("perm", vec![0i64, 1, 3, 2])?],
    )?;
    let scores = b.op("MatMul", &[&q, &k_t], vec![])?;
    let per_head_scores = b.const_i64(&[0, h, -1, 0])?;
    let scores = b.op("Reshape", &[&scores, &per_head_scores], vec![])?;
    let scale = b.const_f32(arch.attention_scale)?;
    let scores = b.op("Mul", &[&scores, &scale], vec![])?;
    let scores = b.op("Add", &[&scores, io::MASK], vec![])?;
    let probs = b.op_named(
        "Softmax",
        &[&scores],
        vec![Attribute::new("axis", -1i64)?],
        Some(io::ATTN_PROBS),
    )?;
    let grouped_probs = b.const_i64(&[0, kv, -1, 0])?;
    let probs_g = b.op("Reshape", &[&probs, &grouped_probs], vec![])?;
    let context = b.op("MatMul", &[&probs_g, &v], vec![])?;
    let context = b.op("Reshape", &[&context, &per_head_scores], vec![])?;
    let context = b.op(
        "Transpose",
        &[&context],
        vec![Attribute::new("perm", vec![0i64, 2, 1, 3])?],
    )?;
    let flat = b.const_i64(&[-1, h * dh])?;
    let mut context = b.op("Reshape", &[&context, &flat], vec![])?;
    if patched {
        context = b.hooked(&context, io::Z_KEEP, io::Z_ADD)?;
    }
    let context = b.op_named("Identity", &[&context], vec![], Some(io::Z))?;
    let transposed = has("qkv.weight"); // GPT-2 stores every projection as Conv1D
    let mut attn = b.linear(&context, "o.weight", opt("o.bias"), transposed)?;
    if arch.layout == Layout::Sandwich {
        attn = norm(b, &attn, "post_attn_norm")?;
    }
    if patched {
        attn = b.hooked(&attn, io::ATTN_KEEP, io::ATTN_ADD)?;
    }
    let attn = b.op_named("Identity", &[&attn], vec![], Some(io::ATTN_UPDATE))?;
    let mut x1 = b.op("Add", &[x, &attn], vec![])?;
    if arch.layout == Layout::PostNorm {
        x1 = norm(b, &x1, "post_attn_norm")?;
    }
    Ok(x1)
}

/// The block norm `prefix` (`attn_norm`, `mlp_norm`, …) on `x`, with its
/// bias when the checkpoint has one.
fn sublayer_norm(
    b: &mut Builder,
    arch: &Arch,
    weights: &WeightShapes,
    x: &str,
    prefix: &str,
) -> Result<String> {
    let weight = format!("{prefix}.weight");
    let bias = format!("{prefix}.bias");
    let bias = weights.contains_key(bias.as_str()).then_some(bias.as_str());
    b.norm(arch.norm, x, &weight, bias)
}

/// The head: final norm and unembedding, `[T, hidden]` → logits `[T, vocab]`.
/// Applied to any residual it is the logit lens.
pub fn head(arch: &Arch, weights: &WeightShapes) -> Result<Model> {
    let mut b = Builder::new()?;
    b.input(
        io::RESIDUAL,
        TensorElementType::Float32,
        &[-1, arch.hidden as i64],
    );
    // The vocabulary axis is left open so that a run can feed the rows of a
    // few token ids only (`Request::loss_vocab`), or one tile of a
    // vocabulary too large for the memory budget.
    declare_weights(&mut b, weights, &["lm_head.weight", "lm_head.bias"]);
    let has = |n: &str| weights.contains_key(n);
    let mut x = io::RESIDUAL.to_string();
    if has("final_norm.weight") {
        let bias = has("final_norm.bias").then_some("final_norm.bias");
        x = b.norm(arch.norm, &x, "final_norm.weight", bias)?;
    }
    let bias = has("lm_head.bias").then_some("lm_head.bias");
    let mut logits = b.linear(&x, "lm_head.weight", bias, false)?;
    if let Some(cap) = arch.final_logit_softcap {
        let cap = b.const_f32(cap)?;
        let scaled = b.op("Div", &[&logits, &cap], vec![])?;
        let squashed = b.op("Tanh", &[&scaled], vec![])?;
        logits = b.op("Mul", &[&squashed, &cap], vec![])?;
    }
    b.op_named("Identity", &[&logits], vec![], Some(io::LOGITS))?;
    b.finish(&[(io::LOGITS, 2)])
}
