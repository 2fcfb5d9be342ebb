//! The forward engine: sessions for the embedding, each distinct block shape
//! and the head, run block by block so the host sees — and may change — the
//! residual stream between any two blocks.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};

use ort::session::{
    builder::GraphOptimizationLevel, OutputSelector, RunOptions, Session, SessionInputValue,
};
use ort::value::TensorRef;

use probe_contract::{Branches, LensReply, LensRequest};
use probe_store::schema::Schema;
use probe_store::store::Checkpoint;

use crate::graph::{self, io, BlockGraphKind, WeightShapes};
use crate::weights::{f32_bytes, WeightCache, WeightStats};
use crate::{runtime, ForwardError};
use probe_store::arch::{Arch, Attention, WeightMap};

/// Where the graphs run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Device {
    #[default]
    Cpu,
    /// The CUDA execution provider, registered strictly: if it cannot be,
    /// opening the engine fails rather than running on the CPU.
    Cuda,
}

impl Device {
    pub fn as_str(&self) -> &'static str {
        match self {
            Device::Cpu => "cpu",
            Device::Cuda => "cuda",
        }
    }
}

#[derive(Clone, Copy, Debug, Default)]
pub struct EngineOptions {
    pub device: Device,
    /// Intra-op threads; 0 lets ONNX Runtime use every core.
    pub threads: usize,
    /// The most bytes of converted (f32) weights held at once; `None` keeps
    /// every converted tensor for the engine's life. See [`crate::weights`].
    pub memory_budget: Option<usize>,
}

/// What to keep from a run besides the final residual.
#[derive(Clone, Copy, Debug, Default)]
pub struct Capture {
    /// The residual after the embedding and after every block run.
    pub residuals: bool,
    /// What each block's attention and MLP added (before any post-norm of BERT).
    pub updates: bool,
    /// Attention probabilities `[heads, T, T]` per block run.
    pub attention: bool,
    /// Logits `[T, vocab]` from the final residual.
    pub logits: bool,
    /// The next-token losses (from logits computed and, unless `logits`,
    /// dropped here: a batch of loss-only runs need not hold them all).
    pub loss: bool,
    /// Every head's output before the output projection `[T, heads ×
    /// head_dim]` per block run (`z`).
    pub z: bool,
}

/// A change to the residual stream at one (stage, position): stage 0 is the
/// embedding output, stage `s` the output of the `s`-th block run. The
/// contract's type, so a plugin's edit reaches the engine as it was written.
pub use probe_contract::{Edit, EditChange, Hook, Sublayer};

/// One forward pass to make.
#[derive(Clone, Debug, Default)]
pub struct Request<'a> {
    pub tokens: &'a [u32],
    /// Blocks to run, in this order; `None` runs all in stored order. Leaving
    /// a block out skips it; listing one twice runs it twice.
    pub blocks: Option<&'a [usize]>,
    pub edits: &'a [Edit],
    /// Start from this residual `[T, hidden]` instead of the embedding's
    /// output (a caller that caches a prefix runs only what follows it).
    pub start: Option<&'a [f32]>,
    pub capture: Capture,
    /// With `capture.logits`: compute them over these token ids (and the
    /// text's own tokens) only, not the whole vocabulary. The loss is then a
    /// softmax restricted to that set — lower than the model's loss, but a
    /// fraction of the head's cost, for callers that compare many runs of one
    /// text (the ids a model finds likely carry nearly all the mass).
    pub loss_vocab: Option<&'a [u32]>,
    /// The tokens are a prefix and continuations of it that attend to the
    /// prefix and themselves only (the contract's `Branches`): several
    /// completions of one prompt in one pass, the prompt computed once.
    pub branches: Option<&'a Branches>,
    /// Block tensors that read as other values in this request only
    /// (quantized, ablated or truncated weights), at most one per tensor.
    pub overrides: &'a [WeightOverride<'a>],
    /// Run only this sublayer of every block (the contract's [`Sublayer`]):
    /// the residual after a run is that sublayer's output.
    pub sublayer: Option<Sublayer>,
    /// Per block run, the block whose kind ([`BlockKind`]: attention
    /// pattern and rotary table) it runs with; `None`: each its own.
    pub kinds: Option<&'a [usize]>,
}

/// Values that replace one stored tensor of a block in a request: the
/// tensor's own shape and stored orientation, borrowed from the caller.
/// Requests that override a block's tensors with the same buffers share its
/// session runs; the stored values are never touched.
#[derive(Clone, Copy, Debug)]
pub struct WeightOverride<'a> {
    /// The stored tensor's name.
    pub tensor: &'a str,
    pub values: &'a [f32],
}

/// What a forward pass produced. Matrices are row-major.
#[derive(Clone, Debug, Default)]
pub struct Trace {
    pub tokens: Vec<u32>,
    /// The blocks run, in order.
    pub blocks: Vec<usize>,
    pub hidden: usize,
    pub heads: usize,
    pub vocab: usize,
    /// `blocks.len() + 1` residuals `[T, hidden]` when captured.
    pub residuals: Vec<Vec<f32>>,
    pub attn_updates: Vec<Vec<f32>>,
    pub mlp_updates: Vec<Vec<f32>>,
    pub attention: Vec<Vec<f32>>,
    /// `[T, heads × head_dim]` per block run when captured.
    pub z: Vec<Vec<f32>>,
    /// The residual after the last block run.
    pub output: Vec<f32>,
    /// `[T, vocab]`, or `[T, vocab_ids.len()]` over a restricted vocabulary.
    pub logits: Option<Vec<f32>>,
    /// The token ids the logits' columns stand for (ascending) when the run
    /// asked for a restricted vocabulary; `None` for the whole vocabulary.
    pub vocab_ids: Option<Vec<u32>>,
    /// Next-token losses computed by the engine (`Capture::loss`).
    pub per_token_loss: Option<Vec<f64>>,
}

impl Trace {
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Cross-entropy of each next token (`T - 1` values), in nats.
    pub fn token_losses(&self) -> Option<Vec<f64>> {
        if let Some(losses) = &self.per_token_loss {
            return Some(losses.clone());
        }
        let logits = self.logits.as_ref()?;
        match &self.vocab_ids {
            None => Some(token_losses(logits, self.vocab, &self.tokens)),
            Some(ids) => {
                // Every next token is in `ids` by construction (see `Engine::run`).
                let columns: Vec<u32> = self
                    .tokens
                    .iter()
                    .map(|id| ids.binary_search(id).map_or(0, |c| c as u32))
                    .collect();
                Some(token_losses(logits, ids.len(), &columns))
            }
        }
    }

    /// Mean next-token cross-entropy; `None` without logits or with one token.
    pub fn loss(&self) -> Option<f64> {
        self.losses().1
    }

    /// [`Trace::token_losses`] and their mean from one pass over the logits
    /// (the pass is the expensive part: callers that need both ask here).
    pub fn losses(&self) -> (Option<Vec<f64>>, Option<f64>) {
        let per_token = self.token_losses();
        let mean = per_token
            .as_deref()
            .filter(|l| !l.is_empty())
            .map(|l| l.iter().sum::<f64>() / l.len() as f64);
        (per_token, mean)
    }
}

/// Cross-entropy of `tokens[t + 1]` under `logits[t]`. The exponentials are
/// f32 (each within 1e-7 relative, after subtracting the row's maximum) and
/// summed in f64; rows run in parallel. This runs on every loss a plugin
/// asks for — 12.6 M exponentials for 256 SmolLM2 positions — so it must not
/// cost more than the head's matrix product.
pub fn token_losses(logits: &[f32], vocab: usize, tokens: &[u32]) -> Vec<f64> {
    use rayon::prelude::*;
    (0..tokens.len().saturating_sub(1))
        .into_par_iter()
        .map(|t| {
            let row = &logits[t * vocab..(t + 1) * vocab];
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let sum: f64 = row.iter().map(|&l| f64::from((l - max).exp())).sum();
            f64::from(max) + sum.ln() - f64::from(row[tokens[t + 1] as usize])
        })
        .collect()
}

/// The most tokens one block run carries as `B` sequences of one length:
/// their attention is per sequence, so only the weights' reuse and the
/// activations' size set it.
pub const STACK_TOKENS: usize = 512;

/// The most tokens one block run packs from sequences of different lengths.
/// Packed attention costs as if every query saw the whole pack (the mask
/// only hides the other sequences), so packs are capped lower: on SmolLM2
/// over the built-in prompt set (lengths 17–39) knockout took 61 s at 512,
/// 55 s at 256 and 56 s at 128 (2 cores, 2026-12-05), while a same-length
/// workload (shuffle's candidate chains) took 3.0 s with 512-token stacks
/// and 3.6 s with 256.
pub const PACKED_TOKENS: usize = 256;

/// The most logits one stacked head run produces (64 MB of f32).
const STACK_LOGITS: usize = 16 << 20;

/// A request of a batch while it runs.
pub(crate) struct Pending {
    /// The residual after the blocks run so far.
    pub(crate) residual: Vec<f32>,
    /// How many of `trace.blocks` have run.
    pub(crate) done: usize,
    pub(crate) trace: Trace,
    /// Keys and values of every block run, when the batch keeps them (the
    /// prompt pass of [`Engine::generate`], the bases of `suffix`).
    pub(crate) cache: Vec<KeysValues>,
}

/// One block run's keys (rotated) and values of one request, each
/// `[kv_heads, T, head_dim]`.
pub(crate) type KeysValues = (Vec<f32>, Vec<f32>);

/// A block session and the blocks that run on it.
pub(crate) struct BlockGraph {
    pub(crate) session: Session,
    /// The weight shapes the graph was built for.
    pub(crate) shapes: WeightShapes,
    /// The other kinds — a cache step, one sublayer alone, the block with
    /// its hooks open — built the first time a request needs one.
    pub(crate) variants: HashMap<BlockGraphKind, Session>,
    /// The weight inputs each kind's graph reads (a sublayer's graph reads
    /// that sublayer's weights only).
    pub(crate) reads: HashMap<BlockGraphKind, Vec<&'static str>>,
}

impl BlockGraph {
    /// Run this block's graph of `kind` (built already) and copy out the
    /// outputs named.
    pub(crate) fn run(
        &mut self,
        kind: BlockGraphKind,
        inputs: Vec<(Cow<'static, str>, SessionInputValue<'_>)>,
        outputs: &[&'static str],
        fail: &dyn Fn(ort::Error) -> ForwardError,
    ) -> Result<HashMap<&'static str, Vec<f32>>, ForwardError> {
        let session = match kind {
            BlockGraphKind::Whole => Some(&mut self.session),
            _ => self.variants.get_mut(&kind),
        }
        .ok_or_else(|| ForwardError::Runtime(format!("no {kind:?} session was built")))?;
        let selector = outputs
            .iter()
            .fold(OutputSelector::no_default(), |s, name| s.with(*name));
        let run_options = RunOptions::new().map_err(fail)?.with_outputs(selector);
        let results = session
            .run_with_options(inputs, &run_options)
            .map_err(fail)?;
        let mut arrays = HashMap::new();
        for &name in outputs {
            let values = results[name].try_extract_tensor::<f32>().map_err(fail)?.1;
            arrays.insert(name, values.to_vec());
        }
        Ok(arrays)
    }
}

/// The weight inputs a session declares, of those a block graph may read.
fn weight_reads(session: &Session, shapes: &WeightShapes) -> Vec<&'static str> {
    shapes
        .keys()
        .copied()
        .filter(|k| session.inputs().iter().any(|i| i.name() == *k))
        .collect()
}

pub struct Engine<'c> {
    pub(crate) checkpoint: &'c Checkpoint,
    pub arch: Arch,
    pub(crate) map: WeightMap,
    /// f32 values of every tensor the graphs read: borrowed from the mapping
    /// when stored as aligned F32, converted on use under the memory budget
    /// otherwise.
    pub(crate) weights: WeightCache<'c>,
    embed: Session,
    pub(crate) graphs: Vec<BlockGraph>,
    /// Index into `graphs` for each block.
    pub(crate) graph_of: Vec<usize>,
    head: Option<Session>,
    /// The unembedding rows (and biases) of the last restricted vocabulary
    /// asked for: a caller comparing runs asks for the same set every time.
    head_rows: Option<HeadRows>,
    pub device: Device,
    pub(crate) options: EngineOptions,
    /// Block session runs so far (a stacked run counts once).
    pub(crate) block_runs: usize,
    /// Rows × blocks that edited runs took from a shared base run instead
    /// of running them (`suffix`).
    pub(crate) rows_reused: usize,
}

/// Rows of the head's weight (and bias) for a set of token ids.
struct HeadRows {
    ids: Vec<u32>,
    /// (graph input, shape, values) per head weight that has a vocabulary axis.
    inputs: Vec<(&'static str, Vec<usize>, Vec<f32>)>,
}

impl HeadRows {
    fn bytes(&self) -> usize {
        self.inputs.iter().map(|(_, _, v)| f32_bytes(v.len())).sum()
    }
}

pub(crate) fn ort_error<'a>(
    file: &'a Checkpoint,
    what: &str,
) -> impl Fn(ort::Error) -> ForwardError + 'a {
    let what = what.to_string();
    move |e| ForwardError::Onnx {
        file: file.path.clone(),
        what: what.clone(),
        message: e.to_string(),
    }
}

/// A session builder for `options`: threads, and the device registered
/// strictly (an execution provider that cannot be registered is an error,
/// never a silent fall back to the CPU).
pub(crate) fn session_builder(
    options: EngineOptions,
    fail: &dyn Fn(ort::Error) -> ForwardError,
) -> Result<ort::session::builder::SessionBuilder, ForwardError> {
    let environment = runtime::environment()?;
    let mut builder = Session::builder(environment)
        .map_err(fail)?
        .with_optimization_level(GraphOptimizationLevel::All)
        .map_err(|e| fail(e.into()))?;
    if options.threads > 0 {
        builder = builder
            .with_intra_threads(options.threads)
            .map_err(|e| fail(e.into()))?;
    }
    if options.device == Device::Cuda {
        builder = builder
            .with_execution_providers([ort::ep::CUDA::default().build().error_on_failure()])
            .map_err(|e| ForwardError::Device {
                device: "cuda",
                message: e.to_string(),
            })?;
    }
    Ok(builder)
}

/// Check that forward passes can run with `options` (ONNX Runtime found,
/// the device's provider registered) before any work is done.
pub fn check_options(options: EngineOptions) -> Result<(), ForwardError> {
    session_builder(options, &|e| ForwardError::Runtime(e.to_string())).map(|_| ())
}

impl<'c> Engine<'c> {
    /// Build the graphs and sessions for a checkpoint.
    pub fn open(checkpoint: &'c Checkpoint, options: EngineOptions) -> Result<Self, ForwardError> {
        let schema = Schema::of(checkpoint);
        let (arch, map) = Arch::of(checkpoint, &schema)?;
        // Load ONNX Runtime before any of its API is touched (the model
        // editor below included): a missing library is an error, not a panic.
        runtime::environment()?;

        let names = map
            .embed
            .values()
            .chain(map.head.values())
            .chain(map.blocks.iter().flat_map(|b| b.values()));
        // The embedding table and the unembedding are read a few rows at a
        // time (a run's tokens, a tile of the vocabulary).
        let by_rows: Vec<&str> = [map.embed.get("embed.weight")]
            .into_iter()
            .chain(["lm_head.weight", "lm_head.bias"].map(|i| map.head.get(i)))
            .flatten()
            .map(String::as_str)
            .collect();
        let mut weights = WeightCache::new(checkpoint, names, &by_rows, options.memory_budget)?;
        weights.feeds_a_device(options.device == Device::Cuda);
        let shapes = |inputs: &BTreeMap<&'static str, String>| -> WeightShapes {
            inputs
                .iter()
                .map(|(k, v)| (*k, weights.shapes()[v].clone()))
                .collect()
        };
        check_shapes(checkpoint, &arch, &map, weights.shapes())?;

        let session = |model: ort::editor::Model, what: &str| -> Result<Session, ForwardError> {
            let builder = session_builder(options, &ort_error(checkpoint, what))?;
            model
                .into_session(&builder)
                .map_err(ort_error(checkpoint, what))
        };

        let embed_shapes = shapes(&map.embed);
        let embed_model = graph::embedding(&arch, &embed_shapes)
            .map_err(ort_error(checkpoint, "building the embedding graph"))?;
        let embed = session(embed_model, "creating the embedding session")?;

        let mut graphs = Vec::new();
        let mut graph_of = Vec::new();
        let mut by_shapes: BTreeMap<Vec<(&'static str, Vec<usize>)>, usize> = BTreeMap::new();
        for (layer, inputs) in map.blocks.iter().enumerate() {
            let block_shapes = shapes(inputs);
            let key: Vec<_> = block_shapes.iter().map(|(k, v)| (*k, v.clone())).collect();
            let index = match by_shapes.get(&key) {
                Some(&i) => i,
                None => {
                    let model = graph::block(&arch, &block_shapes, BlockGraphKind::Whole).map_err(
                        ort_error(checkpoint, &format!("building the graph of block {layer}")),
                    )?;
                    let session =
                        session(model, &format!("creating the session of block {layer}"))?;
                    let reads = weight_reads(&session, &block_shapes);
                    graphs.push(BlockGraph {
                        session,
                        shapes: block_shapes,
                        variants: HashMap::new(),
                        reads: HashMap::from([(BlockGraphKind::Whole, reads)]),
                    });
                    by_shapes.insert(key, graphs.len() - 1);
                    graphs.len() - 1
                }
            };
            graph_of.push(index);
        }

        let head = if arch.has_head {
            let head_shapes = shapes(&map.head);
            let model = graph::head(&arch, &head_shapes)
                .map_err(ort_error(checkpoint, "building the head graph"))?;
            Some(session(model, "creating the head session")?)
        } else {
            None
        };

        Ok(Engine {
            checkpoint,
            arch,
            map,
            weights,
            embed,
            graphs,
            graph_of,
            head,
            head_rows: None,
            device: options.device,
            options,
            block_runs: 0,
            rows_reused: 0,
        })
    }

    /// What the weight cache holds and has done (see [`crate::weights`]).
    pub fn weight_stats(&self) -> WeightStats {
        self.weights.stats()
    }

    /// Block session runs so far: a batch that stacks sequences makes fewer.
    pub fn block_runs(&self) -> usize {
        self.block_runs
    }

    /// Rows × blocks so far that edited runs took from a shared unedited run
    /// instead of running them again (see the `suffix` module).
    pub fn rows_reused(&self) -> usize {
        self.rows_reused
    }

    pub fn num_blocks(&self) -> usize {
        self.graph_of.len()
    }

    /// Distinct block graphs built (blocks with the same tensors share one).
    pub fn num_block_graphs(&self) -> usize {
        self.graphs.len()
    }

    pub fn has_head(&self) -> bool {
        self.head.is_some()
    }

    /// The graph inputs `reads` of `inputs` (graph input → stored tensor),
    /// fed from the cache (loaded by the caller) or, for a tensor in
    /// `overrides`, from the override.
    pub(crate) fn weight_inputs<'v>(
        weights: &'v WeightCache<'c>,
        inputs: &BTreeMap<&'static str, String>,
        reads: &[&'static str],
        overrides: &'v [WeightOverride<'v>],
        into: &mut Vec<(Cow<'static, str>, SessionInputValue<'v>)>,
    ) -> Result<(), ort::Error> {
        for input in reads {
            let name = &inputs[input];
            let data = match overrides.iter().find(|o| o.tensor == name) {
                Some(o) => o.values,
                None => weights.get(name).ok_or_else(|| {
                    ort::Error::new(format!("the weights of `{name}` are not loaded"))
                })?,
            };
            let shape = weights.shape(name).unwrap_or_default().to_vec();
            let tensor = TensorRef::from_array_view((shape, data))?;
            weights.fed(data.len());
            into.push((Cow::Borrowed(*input), tensor.into()));
        }
        Ok(())
    }

    /// The stored tensors `block`'s graph of `kind` reads that `overrides`
    /// do not replace.
    fn block_tensors<'s>(
        &'s self,
        block: usize,
        kind: BlockGraphKind,
        overrides: &[WeightOverride<'_>],
    ) -> Vec<&'s str> {
        let inputs = &self.map.blocks[block];
        self.graphs[self.graph_of[block]]
            .reads
            .get(&kind)
            .into_iter()
            .flatten()
            .map(|input| inputs[input].as_str())
            .filter(|name| !overrides.iter().any(|o| o.tensor == *name))
            .collect()
    }

    /// Load what `block`'s graph of `kind` reads (built already) into the
    /// weight cache; the graph's weight inputs.
    pub(crate) fn load_block(
        &mut self,
        block: usize,
        kind: BlockGraphKind,
        overrides: &[WeightOverride<'_>],
    ) -> Result<Vec<&'static str>, ForwardError> {
        let names: Vec<String> = self
            .block_tensors(block, kind, overrides)
            .into_iter()
            .map(str::to_string)
            .collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let what = match kind {
            BlockGraphKind::Attention => format!("the attention of block {block}"),
            BlockGraphKind::Mlp => format!("the MLP of block {block}"),
            BlockGraphKind::AttentionStep => format!("the attention of block {block}"),
            _ => format!("block {block}"),
        };
        self.weights.load(&names, &what)?;
        Ok(self.graphs[self.graph_of[block]].reads[&kind].clone())
    }

    /// Run `block`'s graph of `kind` (built already): its weights loaded
    /// into the cache and fed beside `inputs` (every other input), the
    /// outputs named copied out.
    pub(crate) fn run_block_graph(
        &mut self,
        block: usize,
        kind: BlockGraphKind,
        inputs: Vec<(Cow<'static, str>, SessionInputValue<'_>)>,
        overrides: &[WeightOverride<'_>],
        outputs: &[&'static str],
        fail: &dyn Fn(ort::Error) -> ForwardError,
    ) -> Result<HashMap<&'static str, Vec<f32>>, ForwardError> {
        let reads = self.load_block(block, kind, overrides)?;
        let mut inputs = inputs;
        Self::weight_inputs(
            &self.weights,
            &self.map.blocks[block],
            &reads,
            overrides,
            &mut inputs,
        )
        .map_err(fail)?;
        let arrays = self.graphs[self.graph_of[block]].run(kind, inputs, outputs, fail)?;
        self.block_runs += 1;
        Ok(arrays)
    }

    /// Whether `block`'s converted weights fit the budget at once; a block
    /// that does not runs as its attention and then its MLP.
    pub(crate) fn block_fits(&self, block: usize, overrides: &[WeightOverride<'_>]) -> bool {
        let names = self.block_tensors(block, BlockGraphKind::Whole, overrides);
        self.weights
            .fits(self.weights.converted_size(names.into_iter()))
    }

    /// Run one forward pass.
    pub fn run(&mut self, request: &Request<'_>) -> Result<Trace, ForwardError> {
        let mut traces = self.run_batch(std::slice::from_ref(request))?;
        Ok(traces.remove(0))
    }

    /// Run several forward passes; the traces come back in request order,
    /// each what [`Engine::run`] gives for its request (to the rounding of a
    /// larger matrix product). Sequences that run the same block at the same
    /// distance from their end are stacked along the token axis into one
    /// session run (a block-diagonal mask keeps them apart, positions restart
    /// per sequence), so they share one read of the block's weights: a block
    /// run on few tokens costs about as much as on a few hundred, because
    /// reading the weights, not multiplying them, is what takes the time.
    /// Aligning by blocks left, not blocks done, is what lets chains that
    /// differ early and share their suffix (candidate orders) run together.
    pub fn run_batch(&mut self, requests: &[Request<'_>]) -> Result<Vec<Trace>, ForwardError> {
        Ok(self
            .run_batch_keeping(requests, false)?
            .into_iter()
            .map(|(trace, _)| trace)
            .collect())
    }

    /// [`Engine::run_batch`], with every block run's keys and values per
    /// request when `keep_cache`.
    pub(crate) fn run_batch_keeping(
        &mut self,
        requests: &[Request<'_>],
        keep_cache: bool,
    ) -> Result<Vec<(Trace, Vec<KeysValues>)>, ForwardError> {
        let hidden = self.arch.hidden;
        let mut pending = Vec::with_capacity(requests.len());
        // Requests of a batch usually share their overrides (one rounded
        // block for every prompt of a set): each buffer is checked once.
        let mut checked = HashSet::new();
        for request in requests {
            let blocks = self.check(request, &mut checked)?;
            let mut residual = self.start_residual(request)?;
            apply_edits(&mut residual, hidden, request.edits, 0, 0);
            let mut trace = Trace {
                tokens: request.tokens.to_vec(),
                blocks,
                hidden,
                heads: self.arch.heads,
                vocab: self.arch.vocab,
                ..Default::default()
            };
            if request.capture.residuals {
                trace.residuals.push(residual.clone());
            }
            pending.push(Pending {
                residual,
                done: 0,
                trace,
                cache: Vec::new(),
            });
        }
        let longest = requests.iter().map(|r| r.tokens.len()).max().unwrap_or(0);
        let tables: Vec<(Vec<f32>, Vec<f32>)> = self
            .arch
            .ropes
            .iter()
            .map(|r| rope_table(&r.inv_freq, longest))
            .collect();
        if !keep_cache {
            self.run_suffixes(requests, &mut pending, &tables)?;
        }
        let mut masks: HashMap<MaskKey, Vec<f32>> = HashMap::new();
        loop {
            let left = |p: &Pending| p.trace.blocks.len() - p.done;
            let most = pending.iter().map(left).max().unwrap_or(0);
            if most == 0 {
                break;
            }
            // The requests this round, by the block each runs next.
            let mut by_block: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
            for (i, p) in pending.iter().enumerate() {
                if left(p) == most {
                    by_block.entry(p.trace.blocks[p.done]).or_default().push(i);
                }
            }
            // Requests with an edit inside the block they run next (a hook)
            // run on the block's patched graph.
            let hooked: Vec<bool> = pending
                .iter()
                .zip(requests)
                .map(|(p, r)| hooks_at(r.edits, p.done).next().is_some())
                .collect();
            // The kind each request's next block run takes (its own, or
            // the one its `kinds` names).
            let kinds: Vec<usize> = pending
                .iter()
                .zip(requests)
                .map(|(p, r)| match (r.kinds, p.trace.blocks.get(p.done)) {
                    (Some(kinds), _) => kinds[p.done],
                    (None, Some(&block)) => block,
                    (None, None) => 0,
                })
                .collect();
            for (block, members) in by_block {
                let inputs = &self.map.blocks[block];
                for stack in stacks_for_block(&members, requests, inputs, &hooked, &kinds) {
                    let run = StackRun {
                        block,
                        kind: kinds[stack[0]],
                        stack: &stack,
                        keep_cache,
                    };
                    self.run_block(run, requests, &mut pending, &tables, &mut masks)?;
                }
            }
        }
        self.run_heads(requests, &mut pending)?;
        Ok(pending
            .into_iter()
            .map(|mut p| {
                p.trace.output = p.residual;
                (p.trace, p.cache)
            })
            .collect())
    }

    /// Validate a request; the blocks it runs. `checked` holds the override
    /// buffers (tensor, address, length) found valid already in this batch.
    fn check<'r>(
        &self,
        request: &Request<'r>,
        checked: &mut HashSet<(&'r str, usize, usize)>,
    ) -> Result<Vec<usize>, ForwardError> {
        let tokens = request.tokens;
        let t = tokens.len();
        let bad = |problem: String| ForwardError::Request {
            file: self.checkpoint.path.clone(),
            problem,
        };
        if t == 0 {
            return Err(bad("no tokens to run".into()));
        }
        if let Some(&id) = tokens.iter().find(|&&id| id as usize >= self.arch.vocab) {
            return Err(bad(format!(
                "token id {id} is outside the vocabulary of {}",
                self.arch.vocab
            )));
        }
        if let Some(&id) = request
            .loss_vocab
            .unwrap_or_default()
            .iter()
            .find(|&&id| id as usize >= self.arch.vocab)
        {
            return Err(bad(format!(
                "loss vocabulary id {id} is outside the vocabulary of {}",
                self.arch.vocab
            )));
        }
        if let Some(branches) = request.branches {
            branches.check(t).map_err(&bad)?;
            if request.capture.logits || request.capture.loss {
                return Err(bad(
                    "a branched sequence has no one next token for its prefix's last row: no logits or loss"
                        .into(),
                ));
            }
            if self
                .arch
                .blocks
                .iter()
                .any(|b| b.attention == Attention::Bidirectional)
            {
                return Err(bad(format!(
                    "branches need a causal model; {} attends both ways",
                    self.arch.family
                )));
            }
        }
        if let Some(max) = self.arch.max_positions {
            let positions = request.branches.map_or(t, |b| {
                b.prefix + b.lengths.iter().max().copied().unwrap_or(0)
            });
            if positions > max {
                return Err(bad(format!(
                    "{positions} positions exceed the {max} learned positions"
                )));
            }
        }
        let blocks: Vec<usize> = match request.blocks {
            Some(blocks) => blocks.to_vec(),
            None => (0..self.num_blocks()).collect(),
        };
        if let Some(&b) = blocks.iter().find(|&&b| b >= self.num_blocks()) {
            return Err(bad(format!(
                "block {b} does not exist (the model has {})",
                self.num_blocks()
            )));
        }
        let hidden = self.arch.hidden;
        for edit in request.edits {
            if edit.hook.is_resid() && edit.stage > blocks.len() {
                return Err(bad(format!(
                    "edit at stage {} but only {} blocks run",
                    edit.stage,
                    blocks.len()
                )));
            }
            if !edit.hook.is_resid() && edit.stage >= blocks.len() {
                return Err(bad(format!(
                    "{:?} edit in block run {} but only {} blocks run",
                    edit.hook,
                    edit.stage,
                    blocks.len()
                )));
            }
            if !edit.hook.is_resid() && request.sublayer.is_some() {
                return Err(bad(
                    "edits inside a block (attn_out, mlp_out, z) need the whole block: no `sublayer`"
                        .into(),
                ));
            }
            if let Hook::Z { head } = edit.hook {
                if head >= self.arch.heads {
                    return Err(bad(format!(
                        "z edit of head {head}: the model has {} heads",
                        self.arch.heads
                    )));
                }
            }
            if edit.position >= t {
                return Err(bad(format!(
                    "edit at position {} of a {t}-token sequence",
                    edit.position
                )));
            }
            let len = match &edit.change {
                EditChange::Replace(v) | EditChange::Add(v) => v.len(),
            };
            let (want, what) = match edit.hook {
                Hook::Z { .. } => (self.arch.head_dim, "a head's output"),
                _ => (hidden, "the residual"),
            };
            if len != want {
                return Err(bad(format!("edit vector has {len} values, {what} {want}")));
            }
        }
        if let Some(kinds) = request.kinds {
            if kinds.len() != blocks.len() {
                return Err(bad(format!(
                    "{} kinds for {} block runs",
                    kinds.len(),
                    blocks.len()
                )));
            }
            if let Some(&k) = kinds.iter().find(|&&k| k >= self.num_blocks()) {
                return Err(bad(format!(
                    "kind of block {k}: the model has {} blocks",
                    self.num_blocks()
                )));
            }
        }
        if let Some(start) = request.start {
            if Some(start.len()) != t.checked_mul(hidden) {
                return Err(bad(format!(
                    "a start residual of {} values is not {t} × {hidden}",
                    start.len()
                )));
            }
        }
        if (request.capture.logits || request.capture.loss) && self.head.is_none() {
            return Err(bad(format!(
                "a {} checkpoint has no output embedding, so no logits",
                self.arch.family
            )));
        }
        if request.sublayer == Some(Sublayer::Mlp)
            && (request.capture.attention || request.capture.z)
        {
            return Err(bad(
                "a run of the MLP sublayer alone has no attention probabilities or head outputs"
                    .into(),
            ));
        }
        for (k, weights) in request.overrides.iter().enumerate() {
            let buffer = (
                weights.tensor,
                weights.values.as_ptr() as usize,
                weights.values.len(),
            );
            // A buffer that fails ends the batch, so marking it first is safe.
            if checked.insert(buffer) {
                self.check_override(weights).map_err(&bad)?;
            }
            if request.overrides[..k]
                .iter()
                .any(|o| o.tensor == weights.tensor)
            {
                return Err(bad(format!(
                    "tensor `{}` is overridden twice in one request",
                    weights.tensor
                )));
            }
        }
        Ok(blocks)
    }

    /// Whether `weights` can replace its tensor: a tensor some block reads,
    /// with as many values as it holds, all finite.
    pub fn check_override(&self, weights: &WeightOverride<'_>) -> Result<(), String> {
        let name = weights.tensor;
        if !self
            .map
            .blocks
            .iter()
            .any(|b| b.values().any(|n| n == name))
        {
            let stored = self.checkpoint.tensor(name).is_ok();
            return Err(if stored {
                format!("tensor `{name}` is not a block weight: only the blocks' tensors can be overridden (not the embedding, the final norm or the head)")
            } else {
                format!("no tensor `{name}` in the checkpoint to override")
            });
        }
        let shape = self.weights.shape(name).unwrap_or_default();
        let want: usize = shape.iter().product();
        if weights.values.len() != want {
            return Err(format!(
                "an override of `{name}` has {} values; the tensor is {shape:?} ({want})",
                weights.values.len()
            ));
        }
        if let Some(i) = weights.values.iter().position(|v| !v.is_finite()) {
            return Err(format!(
                "an override of `{name}` has a non-finite value at flat index {i}"
            ));
        }
        Ok(())
    }

    /// The residual a request starts from: its `start`, or the embedding of
    /// its tokens.
    fn start_residual(&mut self, request: &Request<'_>) -> Result<Vec<f32>, ForwardError> {
        if let Some(start) = request.start {
            return Ok(start.to_vec());
        }
        let positions: Vec<usize> = match request.branches {
            Some(branches) => branches.positions(),
            None => (0..request.tokens.len()).collect(),
        };
        self.embed(request.tokens, &positions)
    }

    /// The embedding graph's output `[T, hidden]` for tokens at the given
    /// positions (read by learned position embeddings only).
    pub(crate) fn embed(
        &mut self,
        tokens: &[u32],
        positions: &[usize],
    ) -> Result<Vec<f32>, ForwardError> {
        // The graph reads the table's rows of this run's tokens only (ids
        // renumbered to them): a vocabulary's table need not be converted
        // whole, nor held, to embed a few tokens.
        let mut unique = tokens.to_vec();
        unique.sort_unstable();
        unique.dedup();
        let table_name = self.map.embed["embed.weight"].clone();
        let width: usize = self
            .weights
            .shape(&table_name)
            .unwrap_or_default()
            .iter()
            .skip(1)
            .product();
        let others: Vec<&'static str> = self
            .map
            .embed
            .keys()
            .copied()
            .filter(|input| *input != "embed.weight")
            .collect();
        let names: Vec<String> = others.iter().map(|i| self.map.embed[i].clone()).collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        self.weights.load(&names, "the embedding")?;
        let reserved = if self.weights.get(&table_name).is_some() {
            0
        } else {
            f32_bytes(unique.len() * width)
        };
        self.weights
            .reserve(reserved, &names, "the embedding of a run's tokens")?;
        let table = self.gather_rows(&table_name, &unique, width);
        let out = table.and_then(|table| {
            let ids: Vec<i64> = tokens
                .iter()
                .map(|id| unique.binary_search(id).map_or(0, |i| i as i64))
                .collect();
            self.run_embedding(&ids, positions, (&table, unique.len(), width), &others)
        });
        self.weights.unreserve(reserved);
        out
    }

    /// Rows `ids` (ascending) of a tensor `[rows, width]`, stacked.
    fn gather_rows(
        &mut self,
        name: &str,
        ids: &[u32],
        width: usize,
    ) -> Result<Vec<f32>, ForwardError> {
        let mut rows = Vec::with_capacity(ids.len() * width);
        let mut i = 0;
        while i < ids.len() {
            // Consecutive ids are read as one range.
            let mut end = i + 1;
            while end < ids.len() && ids[end] == ids[end - 1] + 1 {
                end += 1;
            }
            let range = ids[i] as usize..ids[end - 1] as usize + 1;
            rows.extend_from_slice(&self.weights.rows(name, range)?);
            i = end;
        }
        Ok(rows)
    }

    /// The embedding graph on ids into `table` (`[rows, width]`).
    fn run_embedding(
        &mut self,
        ids: &[i64],
        positions: &[usize],
        table: (&[f32], usize, usize),
        others: &[&'static str],
    ) -> Result<Vec<f32>, ForwardError> {
        let t = ids.len();
        let positions: Vec<i64> = positions.iter().map(|&p| p as i64).collect();
        let type_ids = vec![0i64; t];
        let fail = ort_error(self.checkpoint, "running the embedding");
        let mut inputs: Vec<(Cow<'static, str>, SessionInputValue<'_>)> = Vec::new();
        inputs.push((
            io::IDS.into(),
            TensorRef::from_array_view(([t], ids))
                .map_err(&fail)?
                .into(),
        ));
        let (rows, count, width) = table;
        self.weights.fed(rows.len());
        inputs.push((
            "embed.weight".into(),
            TensorRef::from_array_view(([count, width], rows))
                .map_err(&fail)?
                .into(),
        ));
        if self.map.embed.contains_key("pos_embed.weight") {
            inputs.push((
                io::POSITIONS.into(),
                TensorRef::from_array_view(([t], &positions[..]))
                    .map_err(&fail)?
                    .into(),
            ));
        }
        if self.map.embed.contains_key("type_embed.weight") {
            inputs.push((
                io::TYPE_IDS.into(),
                TensorRef::from_array_view(([t], &type_ids[..]))
                    .map_err(&fail)?
                    .into(),
            ));
        }
        Self::weight_inputs(&self.weights, &self.map.embed, others, &[], &mut inputs)
            .map_err(&fail)?;
        let outputs = self.embed.run(inputs).map_err(&fail)?;
        Ok(outputs[io::OUT]
            .try_extract_tensor::<f32>()
            .map_err(&fail)?
            .1
            .to_vec())
    }

    /// Build the session of `block`'s graph of `kind` unless it exists.
    pub(crate) fn build_variant(
        &mut self,
        block: usize,
        kind: graph::BlockGraphKind,
    ) -> Result<(), ForwardError> {
        let g = self.graph_of[block];
        if kind == graph::BlockGraphKind::Whole || self.graphs[g].variants.contains_key(&kind) {
            return Ok(());
        }
        let what = format!("building the {kind:?} graph of block {block}");
        let fail = ort_error(self.checkpoint, &what);
        let model = graph::block(&self.arch, &self.graphs[g].shapes, kind).map_err(&fail)?;
        let builder = session_builder(self.options, &fail)?;
        let session = model.into_session(&builder).map_err(&fail)?;
        let reads = weight_reads(&session, &self.graphs[g].shapes);
        self.graphs[g].reads.insert(kind, reads);
        self.graphs[g].variants.insert(kind, session);
        Ok(())
    }

    /// Run `block` once on the residuals of the requests in `stack`, stacked
    /// along the token axis, and advance each of them by that block. When
    /// they all have one length and layout, the graph sees `B` sequences of
    /// `t` rows under one `[t, t]` mask; otherwise it sees one sequence of
    /// all their rows under a block-diagonal mask made of each request's own
    /// mask, with every row's position its own request's — attention never
    /// crosses from one request to another either way.
    fn run_block(
        &mut self,
        run: StackRun<'_>,
        requests: &[Request<'_>],
        pending: &mut [Pending],
        tables: &[(Vec<f32>, Vec<f32>)],
        masks: &mut HashMap<MaskKey, Vec<f32>>,
    ) -> Result<(), ForwardError> {
        let StackRun {
            block,
            kind,
            stack,
            keep_cache,
        } = run;
        // Every request of a stack runs the same graph (`stacks_for_block`).
        let sublayer = requests[stack[0]].sublayer;
        let patched = hooks_at(requests[stack[0]].edits, pending[stack[0]].done)
            .next()
            .is_some();
        let variant = match (sublayer, patched) {
            (Some(Sublayer::Attention), _) => graph::BlockGraphKind::Attention,
            (Some(Sublayer::Mlp), _) => graph::BlockGraphKind::Mlp,
            (None, true) => graph::BlockGraphKind::Patched,
            (None, false) => graph::BlockGraphKind::Whole,
        };
        self.build_variant(block, variant)?;
        let hidden = self.arch.hidden;
        let fail = ort_error(self.checkpoint, &format!("running block {block}"));
        let kind = self.arch.blocks[kind];
        let shape = |i: usize| (requests[i].tokens.len(), requests[i].branches);
        let uniform = stack.iter().all(|&i| shape(i) == shape(stack[0]));
        // The sequences the mask spans: one shape for a uniform stack, every
        // request's in turn for a packed one.
        let spans: Vec<(usize, Option<&Branches>)> = if uniform {
            vec![shape(stack[0])]
        } else {
            stack.iter().map(|&i| shape(i)).collect()
        };
        let t: usize = spans.iter().map(|&(len, _)| len).sum();
        let lengths: Vec<usize> = stack.iter().map(|&i| requests[i].tokens.len()).collect();
        let n: usize = lengths.iter().sum();
        let stacked: Cow<'_, [f32]> = match stack {
            [one] => Cow::Borrowed(&pending[*one].residual),
            _ => Cow::Owned(
                stack
                    .iter()
                    .flat_map(|&i| pending[i].residual.iter().copied())
                    .collect(),
            ),
        };
        let key: MaskKey = (
            kind.attention,
            spans.iter().map(|&(len, b)| (len, b.cloned())).collect(),
        );
        let mask = masks
            .entry(key)
            .or_insert_with(|| packed_mask(kind.attention, &spans));
        let wants = |f: fn(&Capture) -> bool| stack.iter().any(|&i| f(&requests[i].capture));
        let (updates, attention) = (wants(|c| c.updates), wants(|c| c.attention));
        let z = wants(|c| c.z);
        let (attention_runs, mlp_runs) = (
            sublayer != Some(Sublayer::Mlp),
            sublayer != Some(Sublayer::Attention),
        );
        // The outputs one graph of `half` gives to this stack.
        let outputs_of = |half: BlockGraphKind| -> Vec<&'static str> {
            let (att, mlp) = (
                half != BlockGraphKind::Mlp,
                half != BlockGraphKind::Attention,
            );
            let mut names = vec![io::OUT];
            if updates && att && attention_runs {
                names.push(io::ATTN_UPDATE);
            }
            if updates && mlp && mlp_runs {
                names.push(io::MLP_UPDATE);
            }
            if attention && att {
                names.push(io::ATTN_PROBS);
            }
            if z && att && attention_runs {
                names.push(io::Z);
            }
            if keep_cache && att {
                names.extend([io::KEYS, io::VALUES]);
            }
            names
        };
        let (heads, dh) = (self.arch.heads, self.arch.head_dim);
        let hook_values = patched.then(|| {
            let offsets = stack.iter().scan(0, |row, &i| {
                let first = *row;
                *row += requests[i].tokens.len();
                Some((i, first))
            });
            hook_inputs(
                offsets.map(|(i, first)| (first, 0, hooks_at(requests[i].edits, pending[i].done))),
                n,
                hidden,
                heads * dh,
                dh,
            )
        });
        // Plain sequences take the table's first t rows; branched and packed
        // ones gather each row's position from it.
        let gathered: (Vec<f32>, Vec<f32>);
        let rotation: Option<(&[f32], &[f32])> = match kind.rope {
            None => None,
            Some(rope) => Some(match spans.as_slice() {
                [(_, None)] => (&tables[rope].0[..t * dh], &tables[rope].1[..t * dh]),
                _ => {
                    let positions: Vec<usize> = spans
                        .iter()
                        .flat_map(|&(len, b)| {
                            b.map_or_else(|| (0..len).collect(), Branches::positions)
                        })
                        .collect();
                    let (cos, sin) = &tables[rope];
                    let gather = |table: &[f32]| -> Vec<f32> {
                        positions
                            .iter()
                            .flat_map(|&p| table[p * dh..(p + 1) * dh].iter().copied())
                            .collect()
                    };
                    gathered = (gather(cos), gather(sin));
                    (&gathered.0[..], &gathered.1[..])
                }
            }),
        };
        let feed = BlockFeed {
            rows: n,
            hidden,
            t,
            head_dim: dh,
            z_width: heads * dh,
            rotation,
            mask,
            hooks: hook_values.as_ref(),
        };
        // Every request of a stack overrides this block's tensors alike
        // (`stacks_for_block`): the first one's overrides stand for all.
        let overrides = requests[stack[0]].overrides;
        // A block whose weights do not fit the memory budget at once runs as
        // its attention and then its MLP, each half's weights loaded in turn
        // (the halves chained are the block: the attention graph's output is
        // the block's midpoint, which the MLP graph takes).
        let halves = if variant == BlockGraphKind::Whole && !self.block_fits(block, overrides) {
            self.build_variant(block, BlockGraphKind::Attention)?;
            self.build_variant(block, BlockGraphKind::Mlp)?;
            vec![BlockGraphKind::Attention, BlockGraphKind::Mlp]
        } else {
            vec![variant]
        };
        let mut arrays: HashMap<&'static str, Vec<f32>> = HashMap::new();
        let mut residual = stacked;
        let last = halves.len() - 1;
        for (h, half) in halves.into_iter().enumerate() {
            let inputs = feed.inputs(half, &residual).map_err(&fail)?;
            arrays.extend(self.run_block_graph(
                block,
                half,
                inputs,
                overrides,
                &outputs_of(half),
                &fail,
            )?);
            if h < last {
                // The midpoint the MLP half starts from.
                residual = Cow::Owned(arrays[io::OUT].clone());
            }
        }
        let array = |name: &str| -> Result<&[f32], ForwardError> {
            arrays
                .get(name)
                .map(Vec::as_slice)
                .ok_or_else(|| ForwardError::Runtime(format!("block {block} gave no `{name}`")))
        };
        let out = array(io::OUT)?;
        // A sublayer run alone adds nothing through the other one.
        let zeros = if updates && sublayer.is_some() {
            vec![0.0; n * hidden]
        } else {
            Vec::new()
        };
        let update = |name: &str, runs: bool| -> Result<&[f32], ForwardError> {
            match (updates, runs) {
                (false, _) => Ok(&[][..]),
                (true, true) => array(name),
                (true, false) => Ok(&zeros[..]),
            }
        };
        let attn_update = update(io::ATTN_UPDATE, attention_runs)?;
        let mlp_update = update(io::MLP_UPDATE, mlp_runs)?;
        let probs = if attention {
            array(io::ATTN_PROBS)?
        } else {
            &[][..]
        };
        let head_outputs = if z && attention_runs {
            array(io::Z)?
        } else {
            &[][..]
        };
        let (keys, values) = if keep_cache {
            (array(io::KEYS)?, array(io::VALUES)?)
        } else {
            (&[][..], &[][..])
        };
        let kv_heads = self.arch.kv_heads;
        let mut offset = 0;
        for (s, (&i, &len)) in stack.iter().zip(&lengths).enumerate() {
            let rows = offset * hidden..(offset + len) * hidden;
            let capture = requests[i].capture;
            let p = &mut pending[i];
            p.residual.clear();
            p.residual.extend_from_slice(&out[rows.clone()]);
            if capture.updates {
                p.trace
                    .attn_updates
                    .push(attn_update[rows.clone()].to_vec());
                p.trace.mlp_updates.push(mlp_update[rows].to_vec());
            }
            if capture.z {
                let width = heads * dh;
                p.trace
                    .z
                    .push(head_outputs[offset * width..(offset + len) * width].to_vec());
            }
            if capture.attention {
                p.trace.attention.push(if uniform {
                    let map = heads * t * t;
                    probs[s * map..(s + 1) * map].to_vec()
                } else {
                    // This request's diagonal block of every head's [n, n] map.
                    let mut own = Vec::with_capacity(heads * len * len);
                    for h in 0..heads {
                        for r in offset..offset + len {
                            let row = (h * n + r) * n;
                            own.extend_from_slice(&probs[row + offset..row + offset + len]);
                        }
                    }
                    own
                });
            }
            if keep_cache {
                // Keys are [B, kv, t, dh] for a uniform stack, [1, kv, n, dh]
                // for a packed one: this request's rows of every head.
                let own = |all: &[f32]| -> Vec<f32> {
                    if uniform {
                        let size = kv_heads * len * dh;
                        return all[s * size..(s + 1) * size].to_vec();
                    }
                    let mut rows = Vec::with_capacity(kv_heads * len * dh);
                    for h in 0..kv_heads {
                        let start = (h * n + offset) * dh;
                        rows.extend_from_slice(&all[start..start + len * dh]);
                    }
                    rows
                };
                p.cache.push((own(keys), own(values)));
            }
            offset += len;
            p.done += 1;
            apply_edits(&mut p.residual, hidden, requests[i].edits, p.done, 0);
            if capture.residuals {
                p.trace.residuals.push(p.residual.clone());
            }
        }
        Ok(())
    }

    /// The head on every request that asked for logits or a loss, with the
    /// requests that share a vocabulary stacked into one run.
    fn run_heads(
        &mut self,
        requests: &[Request<'_>],
        pending: &mut [Pending],
    ) -> Result<(), ForwardError> {
        let hidden = self.arch.hidden;
        // Requests by the columns their logits have: the whole vocabulary, or
        // the restricted ids together with the text's own tokens.
        let mut by_vocab: BTreeMap<Option<Vec<u32>>, Vec<usize>> = BTreeMap::new();
        for (i, request) in requests.iter().enumerate() {
            if !(request.capture.logits || request.capture.loss) {
                continue;
            }
            let ids = request.loss_vocab.map(|wanted| {
                let mut ids: Vec<u32> = wanted.iter().chain(request.tokens).copied().collect();
                ids.sort_unstable();
                ids.dedup();
                ids
            });
            by_vocab.entry(ids).or_default().push(i);
        }
        for (ids, members) in by_vocab {
            let columns = ids.as_ref().map_or(self.arch.vocab, Vec::len).max(1);
            let cap = (STACK_LOGITS / columns).max(1);
            for stack in stacks(&members, |i| requests[i].tokens.len(), cap) {
                let lengths: Vec<usize> = stack.iter().map(|&i| requests[i].tokens.len()).collect();
                let n: usize = lengths.iter().sum();
                let stacked: Vec<f32> = stack
                    .iter()
                    .flat_map(|&i| pending[i].residual.iter().copied())
                    .collect();
                let logits = match &ids {
                    None => self.lens(&stacked, n)?,
                    Some(ids) => self.head_over(&stacked, n, ids)?,
                };
                let mut offset = 0;
                for (&i, &t) in stack.iter().zip(&lengths) {
                    let own = logits[offset * columns..(offset + t) * columns].to_vec();
                    let trace = &mut pending[i].trace;
                    trace.vocab_ids = ids.clone();
                    trace.logits = Some(own);
                    if requests[i].capture.loss {
                        trace.per_token_loss = trace.token_losses();
                        if !requests[i].capture.logits {
                            trace.logits = None;
                        }
                    }
                    offset += t;
                }
                debug_assert_eq!(offset * hidden, stacked.len());
            }
        }
        Ok(())
    }

    /// The head (final norm + unembedding) applied to a residual `[T, hidden]`:
    /// the logit lens. Returns logits `[T, vocab]`.
    pub fn lens(&mut self, residual: &[f32], t: usize) -> Result<Vec<f32>, ForwardError> {
        self.head_over_rows(residual, t, false)
    }

    /// The logit lens reduced here (entropy, top-k, target rank and
    /// probability, KL between rows; see [`crate::lens`]): the logits of
    /// the `t` rows never leave the engine whole.
    pub fn lens_reduce(
        &mut self,
        residual: &[f32],
        t: usize,
        request: &LensRequest,
    ) -> Result<LensReply, ForwardError> {
        let hidden = self.arch.hidden;
        let vocab = self.arch.vocab;
        let problem = |problem: String| ForwardError::Request {
            file: self.checkpoint.path.clone(),
            problem,
        };
        if Some(residual.len()) != t.checked_mul(hidden) {
            return Err(problem(format!(
                "a residual of {} values is not {t} × {hidden}",
                residual.len()
            )));
        }
        request.check(t).map_err(problem)?;
        if let Some(&id) = request
            .targets
            .iter()
            .flatten()
            .find(|&&id| id as usize >= vocab)
        {
            return Err(problem(format!(
                "target id {id} is outside the vocabulary of {vocab}"
            )));
        }
        crate::lens::reduce(t, vocab, request, |rows| {
            let mut gathered = Vec::with_capacity(rows.len() * hidden);
            for &row in rows {
                gathered.extend_from_slice(&residual[row * hidden..(row + 1) * hidden]);
            }
            let logits = self.head_over_rows(&gathered, rows.len(), false)?;
            if logits.len() != rows.len() * vocab {
                return Err(ForwardError::Runtime(format!(
                    "the head gave {} logits for {} rows of a vocabulary of {vocab}",
                    logits.len(),
                    rows.len()
                )));
            }
            Ok(logits)
        })
    }

    /// The head over the token ids `ids` (ascending, unique, in range) only:
    /// logits `[T, ids.len()]`, column `j` for `ids[j]`.
    fn head_over(
        &mut self,
        residual: &[f32],
        t: usize,
        ids: &[u32],
    ) -> Result<Vec<f32>, ForwardError> {
        if self.head_rows.as_ref().is_none_or(|rows| rows.ids != ids) {
            if let Some(old) = self.head_rows.take() {
                self.weights.unreserve(old.bytes());
            }
            let vocab_inputs = self.head_vocab_inputs();
            let bytes = vocab_inputs
                .iter()
                .map(|(_, _, width)| f32_bytes(ids.len() * width))
                .sum();
            self.weights
                .reserve(bytes, &[], "the head's rows of a restricted vocabulary")?;
            let mut inputs = Vec::new();
            for (input, name, width) in vocab_inputs {
                let rows = self.gather_rows(&name, ids, width);
                let rows = rows.inspect_err(|_| self.weights.unreserve(bytes))?;
                let mut shape = self.weights.shape(&name).unwrap_or_default().to_vec();
                shape[0] = ids.len();
                inputs.push((input, shape, rows));
            }
            self.head_rows = Some(HeadRows {
                ids: ids.to_vec(),
                inputs,
            });
        }
        self.head_over_rows(residual, t, true)
    }

    /// The head's inputs with a vocabulary axis: (graph input, stored
    /// tensor, values per row).
    fn head_vocab_inputs(&self) -> Vec<(&'static str, String, usize)> {
        self.map
            .head
            .iter()
            .filter(|(input, _)| input.starts_with("lm_head."))
            .map(|(input, name)| {
                let shape = self.weights.shape(name).unwrap_or_default();
                (*input, name.clone(), shape.iter().skip(1).product())
            })
            .collect()
    }

    /// Run the head on `residual`, with the whole unembedding or, when
    /// `restricted`, with the rows in `self.head_rows`. A whole unembedding
    /// larger than the memory budget runs in tiles of rows that fit it, each
    /// converted, run and dropped.
    fn head_over_rows(
        &mut self,
        residual: &[f32],
        t: usize,
        restricted: bool,
    ) -> Result<Vec<f32>, ForwardError> {
        let hidden = self.arch.hidden;
        if self.head.is_none() {
            return Err(ForwardError::Request {
                file: self.checkpoint.path.clone(),
                problem: format!(
                    "a {} checkpoint has no output embedding, so no the logit lens",
                    self.arch.family
                ),
            });
        }
        // `t` may come from a plugin: no product that can overflow.
        if Some(residual.len()) != t.checked_mul(hidden) {
            return Err(ForwardError::Request {
                file: self.checkpoint.path.clone(),
                problem: format!(
                    "a residual of {} values is not {t} × {hidden}",
                    residual.len()
                ),
            });
        }
        let fail = ort_error(self.checkpoint, "running the head");
        // The final norm and everything else without a vocabulary axis.
        let others: Vec<&'static str> = self
            .map
            .head
            .keys()
            .copied()
            .filter(|input| !input.starts_with("lm_head."))
            .collect();
        let other_names: Vec<String> = others.iter().map(|i| self.map.head[i].clone()).collect();
        let vocab_inputs = self.head_vocab_inputs();
        let whole = self.weights.converted_size(
            other_names
                .iter()
                .chain(vocab_inputs.iter().map(|(_, name, _)| name))
                .map(String::as_str),
        );
        let mut load: Vec<&str> = other_names.iter().map(String::as_str).collect();
        let tiled = !restricted && !self.weights.fits(whole);
        if !restricted && !tiled {
            load.extend(vocab_inputs.iter().map(|(_, name, _)| name.as_str()));
        }
        self.weights.load(&load, "the head")?;
        let head = self
            .head
            .as_mut()
            .ok_or_else(|| ForwardError::Runtime("the model has no head".into()))?;
        if restricted || !tiled {
            let vocab: Vec<(&'static str, Vec<usize>, &[f32])> = if restricted {
                let rows = self.head_rows.iter().flat_map(|r| &r.inputs);
                rows.map(|(i, shape, v)| (*i, shape.clone(), &v[..]))
                    .collect()
            } else {
                vocab_inputs
                    .iter()
                    .map(|(input, name, _)| {
                        let shape = self.weights.shape(name).unwrap_or_default().to_vec();
                        (*input, shape, self.weights.get(name).unwrap_or_default())
                    })
                    .collect()
            };
            return Self::run_head(
                head,
                &self.weights,
                &self.map.head,
                &others,
                residual,
                t,
                &vocab,
            )
            .map_err(&fail);
        }
        // Tiles of as many vocabulary rows as the budget holds besides the
        // final norm.
        let vocab = self.arch.vocab;
        let row_bytes: usize = vocab_inputs.iter().map(|(_, _, w)| f32_bytes(*w)).sum();
        let keep: Vec<&str> = other_names.iter().map(String::as_str).collect();
        let room = self.weights.room(&keep).unwrap_or(usize::MAX);
        let tile = (room / row_bytes.max(1)).min(vocab);
        if tile == 0 {
            return Err(ForwardError::Budget {
                file: self.checkpoint.path.clone(),
                what: "the head (its final norm and one vocabulary row)".into(),
                needed: whole.saturating_sub(vocab * row_bytes) + row_bytes,
                budget: self.weights.stats().budget_bytes.unwrap_or_default(),
            });
        }
        let mut logits = vec![0f32; t * vocab];
        for first in (0..vocab).step_by(tile) {
            let rows = first..(first + tile).min(vocab);
            let bytes = rows.len() * row_bytes;
            self.weights.reserve(bytes, &keep, "a tile of the head")?;
            let part = self.head_tile(residual, t, rows.clone(), &vocab_inputs, &others);
            self.weights.unreserve(bytes);
            let part = part?;
            let width = rows.len();
            for (row, out) in part.chunks_exact(width).zip(logits.chunks_exact_mut(vocab)) {
                out[rows.clone()].copy_from_slice(row);
            }
        }
        Ok(logits)
    }

    /// Logits `[t, rows.len()]` of the vocabulary rows `rows`, read and
    /// converted for this call.
    fn head_tile(
        &mut self,
        residual: &[f32],
        t: usize,
        rows: std::ops::Range<usize>,
        vocab_inputs: &[(&'static str, String, usize)],
        others: &[&'static str],
    ) -> Result<Vec<f32>, ForwardError> {
        let mut parts = Vec::with_capacity(vocab_inputs.len());
        for (input, name, width) in vocab_inputs {
            let values = self.weights.rows(name, rows.clone())?.into_owned();
            let mut shape = self.weights.shape(name).unwrap_or_default().to_vec();
            shape[0] = values.len() / (*width).max(1);
            parts.push((*input, shape, values));
        }
        let vocab: Vec<(&'static str, Vec<usize>, &[f32])> = parts
            .iter()
            .map(|(i, shape, v)| (*i, shape.clone(), &v[..]))
            .collect();
        let head = self
            .head
            .as_mut()
            .ok_or_else(|| ForwardError::Runtime("the model has no head".into()))?;
        Self::run_head(
            head,
            &self.weights,
            &self.map.head,
            others,
            residual,
            t,
            &vocab,
        )
        .map_err(ort_error(self.checkpoint, "running the head"))
    }

    /// The head graph on `residual` `[t, hidden]`: its vocabulary weights
    /// given as (graph input, shape, values), the others (`others`) read
    /// from the cache.
    fn run_head(
        head: &mut Session,
        weights: &WeightCache<'c>,
        inputs_map: &BTreeMap<&'static str, String>,
        others: &[&'static str],
        residual: &[f32],
        t: usize,
        vocab: &[(&'static str, Vec<usize>, &[f32])],
    ) -> Result<Vec<f32>, ort::Error> {
        let hidden = residual.len() / t.max(1);
        let mut inputs: Vec<(Cow<'static, str>, SessionInputValue<'_>)> = Vec::new();
        inputs.push((
            io::RESIDUAL.into(),
            TensorRef::from_array_view(([t, hidden], residual))?.into(),
        ));
        for (input, shape, values) in vocab {
            weights.fed(values.len());
            inputs.push((
                Cow::Borrowed(*input),
                TensorRef::from_array_view((shape.clone(), *values))?.into(),
            ));
        }
        Self::weight_inputs(weights, inputs_map, others, &[], &mut inputs)?;
        let outputs = head.run(inputs)?;
        Ok(outputs[io::LOGITS].try_extract_tensor::<f32>()?.1.to_vec())
    }
}

/// The residual edits at `stage` on `residual`, whose first row is the
/// sequence's row `origin` (edits before it are not the caller's).
pub(crate) fn apply_edits(
    residual: &mut [f32],
    hidden: usize,
    edits: &[Edit],
    stage: usize,
    origin: usize,
) {
    for edit in edits
        .iter()
        .filter(|e| e.hook.is_resid() && e.stage == stage && e.position >= origin)
    {
        let row = edit.position - origin;
        let row = &mut residual[row * hidden..(row + 1) * hidden];
        match &edit.change {
            EditChange::Replace(values) => row.copy_from_slice(values),
            EditChange::Add(values) => row.iter_mut().zip(values).for_each(|(r, v)| *r += v),
        }
    }
}

/// A request's edits inside its block run `run` (every hook but the residual).
pub(crate) fn hooks_at(edits: &[Edit], run: usize) -> impl Iterator<Item = &Edit> {
    edits
        .iter()
        .filter(move |e| !e.hook.is_resid() && e.stage == run)
}

/// The patched graph's hook inputs for `n` stacked rows — `z_keep`, `z_add`,
/// `attn_keep`, `attn_add`, `mlp_keep`, `mlp_add` — from each request's first
/// stacked row, the sequence row that row holds (`origin`) and its edits in
/// this block run: keep 1 and add 0 everywhere else.
pub(crate) fn hook_inputs<'e>(
    requests: impl Iterator<Item = (usize, usize, impl Iterator<Item = &'e Edit>)>,
    n: usize,
    hidden: usize,
    z_width: usize,
    head_dim: usize,
) -> [Vec<f32>; 6] {
    let [mut z_keep, mut attn_keep, mut mlp_keep] =
        [z_width, hidden, hidden].map(|w| vec![1.0f32; n * w]);
    let [mut z_add, mut attn_add, mut mlp_add] =
        [z_width, hidden, hidden].map(|w| vec![0.0f32; n * w]);
    for (first, origin, edits) in requests {
        for edit in edits {
            let row = first + edit.position - origin;
            let (keep, add, start) = match edit.hook {
                Hook::Resid => continue,
                Hook::AttnOut => (&mut attn_keep, &mut attn_add, row * hidden),
                Hook::MlpOut => (&mut mlp_keep, &mut mlp_add, row * hidden),
                Hook::Z { head } => (&mut z_keep, &mut z_add, row * z_width + head * head_dim),
            };
            match &edit.change {
                EditChange::Replace(values) => {
                    let span = start..start + values.len();
                    keep[span.clone()].fill(0.0);
                    add[span].copy_from_slice(values);
                }
                EditChange::Add(values) => {
                    for (a, v) in add[start..start + values.len()].iter_mut().zip(values) {
                        *a += v;
                    }
                }
            }
        }
    }
    [z_keep, z_add, attn_keep, attn_add, mlp_keep, mlp_add]
}

/// `cos`/`sin` `[T, head_dim]`, each half repeating the frequencies (the
/// rotate-half convention of Hugging Face checkpoints), computed in f64.
pub fn rope_table(inv_freq: &[f64], t: usize) -> (Vec<f32>, Vec<f32>) {
    let dim = inv_freq.len() * 2;
    let mut cos = Vec::with_capacity(t * dim);
    let mut sin = Vec::with_capacity(t * dim);
    for pos in 0..t {
        for _ in 0..2 {
            for &f in inv_freq {
                let angle = pos as f64 * f;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
    }
    (cos, sin)
}

/// Every input of a stacked block run but the weights and the residual.
struct BlockFeed<'v> {
    rows: usize,
    hidden: usize,
    /// The mask's side.
    t: usize,
    head_dim: usize,
    z_width: usize,
    rotation: Option<(&'v [f32], &'v [f32])>,
    mask: &'v [f32],
    hooks: Option<&'v [Vec<f32>; 6]>,
}

impl<'v> BlockFeed<'v> {
    /// The inputs of a run of `kind` on `residual` `[rows, hidden]`: the
    /// MLP graph reads the residual alone.
    fn inputs(
        &self,
        kind: BlockGraphKind,
        residual: &'v [f32],
    ) -> Result<Vec<(Cow<'static, str>, SessionInputValue<'v>)>, ort::Error> {
        let mut inputs = Vec::new();
        let mut push = |name: &'static str, shape: [usize; 2], data: &'v [f32]| {
            let tensor = TensorRef::from_array_view((shape, data))?;
            inputs.push((Cow::Borrowed(name), tensor.into()));
            Ok::<(), ort::Error>(())
        };
        let (t, dh) = (self.t, self.head_dim);
        push(io::RESIDUAL, [self.rows, self.hidden], residual)?;
        if kind == BlockGraphKind::Mlp {
            return Ok(inputs);
        }
        if let Some((cos, sin)) = self.rotation {
            push(io::COS, [t, dh], cos)?;
            push(io::SIN, [t, dh], sin)?;
        }
        push(io::MASK, [t, t], self.mask)?;
        if let Some(hooks) = self.hooks {
            let (z, d) = (self.z_width, self.hidden);
            for ((name, width), array) in io::HOOKS.into_iter().zip([z, z, d, d, d, d]).zip(hooks) {
                push(name, [self.rows, width], array)?;
            }
        }
        Ok(inputs)
    }
}

/// One session run of a block over a stack of requests.
#[derive(Clone, Copy)]
struct StackRun<'s> {
    block: usize,
    /// The block whose kind (attention pattern, rotary table) it runs with.
    kind: usize,
    /// Indices of the requests, in the order their rows are stacked.
    stack: &'s [usize],
    /// Keep each request's keys and values ([`Pending::cache`]).
    keep_cache: bool,
}

/// Masks are cached per attention kind and the sequences they span.
type MaskKey = (Attention, Vec<(usize, Option<Branches>)>);

/// How the requests running `block` next (`members`, in request order) go
/// into session runs. Requests of one length and layout stack as `B`
/// sequences, `STACK_TOKENS / t` to a run (their attention is the cheapest:
/// each sequence sees only its own rows); what is left over of every shape —
/// short prompts of different lengths, branched groups each laid out its own
/// way — is packed, in order, into runs of up to `PACKED_TOKENS` rows, so the
/// block's weights are read once per few hundred tokens whatever their shapes.
///
/// Only requests that read the block's tensors alike share a run: the same
/// override buffers (by address) for the tensors it reads (`inputs`), or
/// none; the same sublayer (or the whole block); for the whole block,
/// hooks open (an edit inside this block run) or not; and the same kind
/// (`kinds`, per request: the block whose pattern and rotary table it
/// runs with).
fn stacks_for_block(
    members: &[usize],
    requests: &[Request<'_>],
    inputs: &BTreeMap<&'static str, String>,
    hooked: &[bool],
    kinds: &[usize],
) -> Vec<Vec<usize>> {
    // What a run's block reads: which sublayer, whether its hooks are open,
    // its kind, and the override buffers (address, length) among its
    // tensors.
    type ReadKey = (Option<Sublayer>, bool, usize, Vec<(usize, usize)>);
    let read_key = |i: usize| -> ReadKey {
        let request = &requests[i];
        let mut buffers: Vec<(usize, usize)> = request
            .overrides
            .iter()
            .filter(|o| inputs.values().any(|name| name == o.tensor))
            .map(|o| (o.values.as_ptr() as usize, o.values.len()))
            .collect();
        buffers.sort_unstable();
        (request.sublayer, hooked[i], kinds[i], buffers)
    };
    let mut by_weights: BTreeMap<ReadKey, Vec<usize>> = BTreeMap::new();
    for &i in members {
        by_weights.entry(read_key(i)).or_default().push(i);
    }
    let mut runs = Vec::new();
    for alike_weights in by_weights.into_values() {
        let mut by_shape: BTreeMap<(usize, Option<&Branches>), Vec<usize>> = BTreeMap::new();
        for i in alike_weights {
            let request = &requests[i];
            by_shape
                .entry((request.tokens.len(), request.branches))
                .or_default()
                .push(i);
        }
        let mut rest = Vec::new();
        for ((t, _), alike) in by_shape {
            let full = (STACK_TOKENS / t).max(1);
            for chunk in alike.chunks(full) {
                if chunk.len() == full {
                    runs.push(chunk.to_vec());
                } else {
                    rest.extend_from_slice(chunk);
                }
            }
        }
        rest.sort_unstable();
        runs.extend(stacks(&rest, |i| requests[i].tokens.len(), PACKED_TOKENS));
    }
    runs
}

/// The additive mask over sequences packed one after another (`spans`: each
/// one's length and layout): each sequence's own mask on the diagonal, −∞
/// between sequences.
fn packed_mask(attention: Attention, spans: &[(usize, Option<&Branches>)]) -> Vec<f32> {
    if let [(t, layout)] = spans {
        return match layout {
            Some(branches) => branched_mask(attention, branches),
            None => attention_mask(attention, *t),
        };
    }
    let n: usize = spans.iter().map(|&(t, _)| t).sum();
    let mut mask = vec![f32::NEG_INFINITY; n * n];
    let mut offset = 0;
    for &span in spans {
        let t = span.0;
        let own = packed_mask(attention, &[span]);
        for i in 0..t {
            let row = (offset + i) * n + offset;
            mask[row..row + t].copy_from_slice(&own[i * t..(i + 1) * t]);
        }
        offset += t;
    }
    mask
}

/// The additive `[T, T]` mask of a branched sequence: a row attends to the
/// prefix and to its own branch (never another branch), and within those
/// by position, as `attention` allows.
pub fn branched_mask(attention: Attention, branches: &Branches) -> Vec<f32> {
    let (positions, owners) = (branches.positions(), branches.owners());
    let t = positions.len();
    let mut mask = vec![0.0f32; t * t];
    for i in 0..t {
        for j in 0..t {
            let related = owners[j].is_none() || owners[j] == owners[i];
            let (pi, pj) = (positions[i], positions[j]);
            let allowed = related
                && match attention {
                    Attention::Bidirectional => true,
                    Attention::Causal => pj <= pi,
                    Attention::Sliding { window } => pj <= pi && pi - pj < window,
                };
            if !allowed {
                mask[i * t + j] = f32::NEG_INFINITY;
            }
        }
    }
    mask
}

/// Additive `[T, T]` mask: 0 where query `i` may attend to key `j`, −∞ elsewhere.
pub fn attention_mask(attention: Attention, t: usize) -> Vec<f32> {
    let mut mask = vec![0.0f32; t * t];
    for i in 0..t {
        for j in 0..t {
            let allowed = match attention {
                Attention::Bidirectional => true,
                Attention::Causal => j <= i,
                Attention::Sliding { window } => j <= i && i - j < window,
            };
            if !allowed {
                mask[i * t + j] = f32::NEG_INFINITY;
            }
        }
    }
    mask
}

/// Greedy runs of consecutive `members` whose lengths add up to at most
/// `cap` (a member longer than `cap` runs alone).
fn stacks(members: &[usize], length: impl Fn(usize) -> usize, cap: usize) -> Vec<Vec<usize>> {
    let mut out: Vec<Vec<usize>> = Vec::new();
    let mut total = 0;
    for &i in members {
        let t = length(i);
        match out.last_mut() {
            Some(last) if total + t <= cap => {
                last.push(i);
                total += t;
            }
            _ => {
                out.push(vec![i]);
                total = t;
            }
        }
    }
    out
}

/// Every tensor must have the shape the architecture implies: a mismatch
/// is a clear error here rather than an ONNX Runtime shape error later.
fn check_shapes(
    checkpoint: &Checkpoint,
    arch: &Arch,
    map: &WeightMap,
    shapes: &HashMap<String, Vec<usize>>,
) -> Result<(), ForwardError> {
    let (d, h, kv, dh) = (arch.hidden, arch.heads, arch.kv_heads, arch.head_dim);
    let expect = |name: &String, want: &[usize]| -> Result<(), ForwardError> {
        let got = &shapes[name];
        if got.as_slice() != want {
            return Err(ForwardError::Shape {
                file: checkpoint.path.clone(),
                tensor: name.clone(),
                got: got.clone(),
                want: want.to_vec(),
            });
        }
        Ok(())
    };
    let embed = &map.embed["embed.weight"];
    expect(embed, &[arch.vocab, d])?;
    for block in &map.blocks {
        let get = |k: &str| block.get(k);
        if let Some(n) = get("q.weight") {
            expect(n, &[h * dh, d])?;
        }
        for key in ["k.weight", "v.weight"] {
            if let Some(n) = get(key) {
                expect(n, &[kv * dh, d])?;
            }
        }
        if let Some(n) = get("o.weight") {
            if block.contains_key("qkv.weight") {
                expect(n, &[d, d])?;
            } else {
                expect(n, &[d, h * dh])?;
            }
        }
        if let Some(n) = get("qkv.weight") {
            expect(n, &[d, 3 * d])?;
        }
        for key in ["q_norm.weight", "k_norm.weight"] {
            if let Some(n) = get(key) {
                expect(n, &[dh])?;
            }
        }
        for key in [
            "attn_norm.weight",
            "mlp_norm.weight",
            "post_attn_norm.weight",
            "post_mlp_norm.weight",
        ] {
            if let Some(n) = get(key) {
                expect(n, &[d])?;
            }
        }
        if let (Some(up), Some(down)) = (get("up.weight"), get("down.weight")) {
            let up_shape = &shapes[up];
            let inter = if block.contains_key("qkv.weight") {
                up_shape.get(1)
            } else {
                up_shape.first()
            };
            let inter = *inter.unwrap_or(&0);
            if block.contains_key("qkv.weight") {
                expect(up, &[d, inter])?;
                expect(down, &[inter, d])?;
            } else {
                expect(up, &[inter, d])?;
                expect(down, &[d, inter])?;
                if let Some(gate) = get("gate.weight") {
                    expect(gate, &[inter, d])?;
                }
            }
        }
    }
    if let Some(n) = map.head.get("lm_head.weight") {
        expect(n, &[arch.vocab, d])?;
    }
    if let Some(n) = map.head.get("final_norm.weight") {
        expect(n, &[d])?;
    }
    Ok(())
}
