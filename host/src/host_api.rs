//! The host's side of the plugin ABI: the function table a plugin calls
//! during a run, over one open checkpoint.
//!
//! Every function here is `extern "C"` and is called from plugin code, so
//! none may unwind: each body runs under [`host_call`] (the contract's one
//! catch helper), and failures — panics included, with their message —
//! become a status plus a message the plugin reads with `last_error`.

use std::borrow::Cow;
use std::cell::RefCell;
use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use polars::prelude::DataFrame;
use probe_contract::abi::{
    self, ArrowArray, ArrowSchema, F32Buffer, ForwardResultC, HostApi, StrRef, TensorInfoC,
};
use probe_contract::{
    EncodeRequest, ForwardMeta, ForwardRequest, GenerateReply, GenerateRequest, LensRequest,
    ModelInfo, OutputKind, RunInfo, TextMode, WriteReordered,
};
use probe_sdk::table::{c_array_out, c_schema_out};

use crate::forward::text::TextCodec;
use crate::forward::{Capture, Engine, EngineOptions, Request, Trace, WeightOverride};

use crate::plugin::LoadedPlugin;
use crate::progress::Progress;
use crate::schema::Schema;
use crate::store::Checkpoint;

/// Everything a plugin may reach during one call on one checkpoint.
pub struct RunContext<'a> {
    checkpoint: &'a Checkpoint,
    model_json: String,
    run_json: String,
    /// Per tensor: its role's name, whether it is a bias, its block (-1 outside).
    roles: Vec<(&'static str, bool)>,
    layers: Vec<i64>,
    shapes: Vec<Vec<u64>>,
    /// The plugin's own error message (set_error).
    plugin_error: Mutex<Option<String>>,
    progress: &'a Progress,
    cancel: &'a AtomicBool,
    /// Companion tables the plugin emitted, in order.
    companions: Mutex<Vec<(String, DataFrame)>>,
    /// The forward engine, built on the first forward call; one pass at a
    /// time (ONNX Runtime parallelises inside each pass).
    engine: Mutex<Option<Result<Engine<'a>, String>>>,
    engine_options: EngineOptions,
    codec: std::sync::OnceLock<Result<TextCodec, String>>,
    /// Tensor overrides the plugin registered, by id: the tensor's name and
    /// the values it reads as in the requests that list the id.
    overrides: Mutex<TensorOverrides>,
}

/// The overrides of one run and the next id to give out.
#[derive(Default)]
struct TensorOverrides {
    next_id: u64,
    by_id: std::collections::HashMap<u64, (String, Vec<f32>)>,
}

thread_local! {
    /// The message of the last failed host call on this thread (like errno).
    static LAST_ERROR: RefCell<String> = const { RefCell::new(String::new()) };
}

/// Why a plugin call failed, as the plugin said it.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("{0}")]
    Failed(String),
    #[error("panicked ({0})")]
    Panicked(String),
    #[error("cancelled")]
    Cancelled,
    #[error("returned an unreadable table: {0}")]
    BadOutput(String),
    #[error("returned unknown status {0}")]
    UnknownStatus(i32),
}

impl CallError {
    /// What happened, as a verb after the plugin's name.
    pub fn verb(&self) -> &'static str {
        match self {
            CallError::Failed(_) => "failed",
            CallError::Panicked(_) => "panicked",
            CallError::Cancelled => "was cancelled",
            CallError::BadOutput(_) => "returned an unreadable table",
            CallError::UnknownStatus(_) => "returned an unknown status",
        }
    }

    pub fn detail(&self) -> String {
        match self {
            CallError::Failed(m) | CallError::Panicked(m) | CallError::BadOutput(m) => m.clone(),
            CallError::Cancelled => "stopped at the user's request".into(),
            CallError::UnknownStatus(status) => format!("status {status}"),
        }
    }
}

impl<'a> RunContext<'a> {
    pub fn new(
        checkpoint: &'a Checkpoint,
        progress: &'a Progress,
        cancel: &'a AtomicBool,
        engine_options: EngineOptions,
    ) -> Self {
        let schema = Schema::of(checkpoint);
        let model = ModelInfo {
            label: checkpoint.label.clone(),
            family: schema.family,
            num_layers: schema.num_layers,
            hidden_size: schema.hidden_size,
            vocab_size: schema.vocab_size,
            tied_embeddings: schema.tied_embeddings,
            config: checkpoint.config.clone(),
            metadata: checkpoint.user_metadata(),
            chat_template: crate::codec::has_chat_template(checkpoint),
            block_kinds: crate::arch::Arch::of(checkpoint, &schema)
                .map(|(arch, _)| arch.block_kind_ids())
                .unwrap_or_default(),
        };
        let run = RunInfo {
            device: engine_options.device.as_str().to_string(),
            threads: engine_options.threads,
        };
        Self {
            checkpoint,
            model_json: serde_json::to_string(&model).unwrap_or_default(),
            run_json: serde_json::to_string(&run).unwrap_or_default(),
            roles: schema
                .placements
                .iter()
                .map(|p| (p.role.as_str(), p.bias))
                .collect(),
            layers: schema
                .placements
                .iter()
                .map(|p| p.layer.map_or(-1, |l| l as i64))
                .collect(),
            shapes: checkpoint
                .tensors()
                .iter()
                .map(|t| t.shape.iter().map(|&d| d as u64).collect())
                .collect(),
            plugin_error: Mutex::new(None),
            progress,
            cancel,
            companions: Mutex::new(Vec::new()),
            engine: Mutex::new(None),
            engine_options,
            codec: std::sync::OnceLock::new(),
            overrides: Mutex::new(TensorOverrides::default()),
        }
    }

    fn api(&self) -> HostApi {
        HostApi {
            size: std::mem::size_of::<HostApi>(),
            abi: abi::ABI_VERSION,
            ctx: self as *const Self as *const c_void,
            last_error,
            set_error,
            model_json,
            tensor_count,
            tensor_info,
            tensor_f32,
            release_f32,
            progress,
            is_cancelled,
            log,
            emit_table,
            tokenize,
            forward_batch,
            forward_output,
            release_forward,
            lens,
            write_reordered,
            run_info,
            encode,
            lens_reduce,
            generate,
            override_tensor,
            release_override,
        }
    }

    /// What the forward engine's weight cache did, if a forward pass ran.
    pub fn weight_stats(&self) -> Option<crate::forward::WeightStats> {
        let slot = self.engine.lock().unwrap_or_else(|p| p.into_inner());
        slot.as_ref()
            .and_then(|engine| engine.as_ref().ok())
            .map(Engine::weight_stats)
    }

    /// The companion tables emitted so far, taken out.
    pub fn take_companions(&self) -> Vec<(String, DataFrame)> {
        std::mem::take(&mut *self.companions.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn take_error(&self) -> String {
        self.plugin_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .unwrap_or_else(|| "failed without saying why".into())
    }

    fn status_error(&self, status: i32) -> CallError {
        match status {
            abi::STATUS_ERROR => CallError::Failed(self.take_error()),
            abi::STATUS_PANIC => CallError::Panicked(self.take_error()),
            abi::STATUS_CANCELLED => CallError::Cancelled,
            other => CallError::UnknownStatus(other),
        }
    }

    /// Ask the plugin how many work items this checkpoint gives.
    pub fn work_items(&self, plugin: &LoadedPlugin, params_json: &str) -> Result<usize, CallError> {
        let api = self.api();
        let mut count = 0usize;
        // SAFETY: the plugin's own table entry, called with a host table that
        // outlives the call and a valid place for the count.
        let status = unsafe { (plugin.api.work_items)(&api, StrRef::new(params_json), &mut count) };
        if status != abi::STATUS_OK {
            return Err(self.status_error(status));
        }
        Ok(count)
    }

    /// Run the plugin on these work items and import the table it returns.
    pub fn run(
        &self,
        plugin: &LoadedPlugin,
        params_json: &str,
        items: &[usize],
    ) -> Result<DataFrame, CallError> {
        let api = self.api();
        let mut schema = probe_sdk::table::ArrowSchema::empty();
        let mut array = probe_sdk::table::ArrowArray::empty();
        // SAFETY: the plugin's own table entry, called with a host table that
        // outlives the call, `items.len()` indices and valid places for the
        // two output structs (polars-arrow's, which have the interface's layout).
        let status = unsafe {
            (plugin.api.run)(
                &api,
                StrRef::new(params_json),
                items.as_ptr(),
                items.len(),
                probe_sdk::table::c_schema(&mut schema),
                probe_sdk::table::c_array(&mut array),
            )
        };
        if status != abi::STATUS_OK {
            return Err(self.status_error(status));
        }
        // SAFETY: on success the plugin wrote producer-owned Arrow structs;
        // importing takes them over and their release callbacks run on drop.
        unsafe { probe_sdk::table::import_frame(schema, array) }
            .map_err(|e| CallError::BadOutput(e.to_string()))
    }
}

/// Run the body of host function `name` so that nothing unwinds into the
/// plugin: a panic becomes this call's error (the plugin reads it with
/// `last_error`) and `fallback` is returned.
fn host_call<T>(name: &str, fallback: T, body: impl FnOnce() -> T) -> T {
    probe_contract::guard::catch(body).unwrap_or_else(|panic| {
        let _ = fail(format!("probe's `{name}` failed unexpectedly: {panic}"));
        fallback
    })
}

fn fail(message: impl Into<String>) -> i32 {
    LAST_ERROR.with(|slot| *slot.borrow_mut() = message.into());
    abi::STATUS_ERROR
}

/// # Safety
/// `ctx` is the pointer `RunContext::api` put in the table, and the context
/// outlives the call.
unsafe fn context<'a>(ctx: *const c_void) -> &'a RunContext<'a> {
    // SAFETY: as the caller promises.
    unsafe { &*(ctx as *const RunContext<'a>) }
}

/// Copy a string the plugin lent for the call.
///
/// # Safety
/// `text` points to `len` readable bytes (or is null) for the call.
unsafe fn lent(text: StrRef) -> String {
    // SAFETY: as the caller promises.
    unsafe { text.as_str() }.into_owned()
}

unsafe extern "C" fn last_error(_ctx: *const c_void) -> StrRef {
    // The pointer stays valid until this thread's next failing host call.
    host_call("last_error", StrRef::empty(), || {
        LAST_ERROR.with(|slot| StrRef::new(slot.borrow().as_str()))
    })
}

unsafe extern "C" fn set_error(ctx: *const c_void, message: StrRef) {
    host_call("set_error", (), || {
        // SAFETY: the table's own ctx; the message is lent for the call.
        let (run, text) = unsafe { (context(ctx), lent(message)) };
        *run.plugin_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(text);
    })
}

unsafe extern "C" fn model_json(ctx: *const c_void) -> StrRef {
    host_call("model_json", StrRef::empty(), || {
        // SAFETY: the table's own ctx.
        StrRef::new(&unsafe { context(ctx) }.model_json)
    })
}

unsafe extern "C" fn run_info(ctx: *const c_void) -> StrRef {
    host_call("run_info", StrRef::empty(), || {
        // SAFETY: the table's own ctx.
        StrRef::new(&unsafe { context(ctx) }.run_json)
    })
}

unsafe extern "C" fn tensor_count(ctx: *const c_void) -> usize {
    host_call("tensor_count", 0, || {
        // SAFETY: the table's own ctx.
        unsafe { context(ctx) }.checkpoint.tensors().len()
    })
}

unsafe extern "C" fn tensor_info(ctx: *const c_void, index: usize, out: *mut TensorInfoC) -> i32 {
    host_call("tensor_info", abi::STATUS_ERROR, || {
        // SAFETY: the table's own ctx.
        let run = unsafe { context(ctx) };
        let Some(entry) = run.checkpoint.tensors().get(index) else {
            return fail(format!("no tensor with index {index}"));
        };
        if out.is_null() {
            return fail("tensor_info: null output");
        }
        let shape = &run.shapes[index];
        let (role, bias) = run.roles[index];
        // SAFETY: non-null, and the plugin passes a place for one struct; the
        // strings and the shape it points to live as long as the context.
        unsafe {
            out.write(TensorInfoC {
                name: StrRef::new(&entry.name),
                role: StrRef::new(role),
                bias,
                dtype: StrRef::new(entry.dtype.as_str()),
                layer: run.layers[index],
                shape: shape.as_ptr(),
                ndim: shape.len(),
            })
        };
        abi::STATUS_OK
    })
}

/// Lend `values` to the plugin: a borrow stays a borrow (null owner), an
/// owned buffer is boxed and freed by `release_f32`.
fn lend_f32(values: Cow<'_, [f32]>) -> F32Buffer {
    match values {
        Cow::Borrowed(slice) => F32Buffer {
            data: slice.as_ptr(),
            len: slice.len(),
            owner: std::ptr::null_mut(),
        },
        Cow::Owned(vec) => {
            let boxed = Box::new(vec);
            F32Buffer {
                data: boxed.as_ptr(),
                len: boxed.len(),
                owner: Box::into_raw(boxed) as *mut c_void,
            }
        }
    }
}

unsafe extern "C" fn tensor_f32(ctx: *const c_void, index: usize, out: *mut F32Buffer) -> i32 {
    host_call("tensor_f32", abi::STATUS_ERROR, || {
        // SAFETY: the table's own ctx.
        let run = unsafe { context(ctx) };
        let Some(entry) = run.checkpoint.tensors().get(index) else {
            return fail(format!("no tensor with index {index}"));
        };
        if out.is_null() {
            return fail("tensor_f32: null output");
        }
        let values = match run.checkpoint.f32_values(entry) {
            Ok(values) => values,
            Err(error) => return fail(error.to_string()),
        };
        // SAFETY: non-null, and the plugin passes a place for one buffer.
        unsafe { out.write(lend_f32(values)) };
        abi::STATUS_OK
    })
}

unsafe extern "C" fn release_f32(ctx: *const c_void, buffer: *mut F32Buffer) {
    host_call("release_f32", (), || {
        // SAFETY: null or the buffer this host lent, as the ABI requires.
        let Some(buffer) = (unsafe { buffer.as_mut() }) else {
            return;
        };
        if !buffer.owner.is_null() {
            // SAFETY: `owner` came from Box::into_raw in `lend_f32`, and is
            // nulled below so a second release does nothing.
            drop(unsafe { Box::from_raw(buffer.owner as *mut Vec<f32>) });
        } else if !ctx.is_null() {
            // A borrow of the mapping: the plugin is done with those pages.
            // SAFETY: the table's own ctx.
            let run = unsafe { context(ctx) };
            run.checkpoint.release_pages_at(
                buffer.data as usize,
                buffer.len * std::mem::size_of::<f32>(),
            );
        }
        *buffer = F32Buffer::empty();
    })
}

unsafe extern "C" fn progress(ctx: *const c_void, done: u64, total: u64, message: StrRef) {
    host_call("progress", (), || {
        // SAFETY: the table's own ctx; the message is lent for the call.
        let (run, message) = unsafe { (context(ctx), lent(message)) };
        run.progress.update(done, total, &message);
    })
}

unsafe extern "C" fn is_cancelled(ctx: *const c_void) -> bool {
    host_call("is_cancelled", true, || {
        // SAFETY: the table's own ctx.
        unsafe { context(ctx) }.cancel.load(Ordering::Relaxed)
    })
}

unsafe extern "C" fn log(ctx: *const c_void, level: u32, message: StrRef) {
    host_call("log", (), || {
        // SAFETY: the table's own ctx; the message is lent for the call.
        let (run, message) = unsafe { (context(ctx), lent(message)) };
        run.progress.log(level == abi::LOG_WARN, &message);
    })
}

/// Names become part of file names: keep them to letters, digits and `_`.
pub fn is_companion_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

unsafe extern "C" fn emit_table(
    ctx: *const c_void,
    name: StrRef,
    schema: *mut ArrowSchema,
    array: *mut ArrowArray,
) -> i32 {
    use probe_sdk::table::{ArrowArray as Array, ArrowSchema as Schema};
    host_call("emit_table", abi::STATUS_ERROR, || {
        // SAFETY: the table's own ctx; the name is lent for the call.
        let (run, name) = unsafe { (context(ctx), lent(name)) };
        if !is_companion_name(&name) {
            return fail(format!("table name `{name}` must be letters, digits and _"));
        }
        if schema.is_null() || array.is_null() {
            return fail("emit_table: null table");
        }
        // SAFETY: non-null C Data Interface structs the plugin hands over
        // (the contract's opaque names for polars-arrow's layout): moved
        // out, leaving released (empty) ones behind.
        let (schema, array) = unsafe {
            (
                std::ptr::replace(c_schema_out(schema), Schema::empty()),
                std::ptr::replace(c_array_out(array), Array::empty()),
            )
        };
        // SAFETY: structs the plugin exported, now owned here; import checks
        // them before reading and releases them.
        match unsafe { probe_sdk::table::import_frame(schema, array) } {
            Ok(frame) => {
                let mut companions = run.companions.lock().unwrap_or_else(|p| p.into_inner());
                match companions.iter_mut().find(|(n, _)| *n == name) {
                    Some((_, existing)) => {
                        if let Err(e) = existing.vstack_mut(&frame) {
                            return fail(format!("table `{name}` changed its columns: {e}"));
                        }
                    }
                    None => companions.push((name, frame)),
                }
                abi::STATUS_OK
            }
            Err(e) => fail(format!("table `{name}` is unreadable: {e}")),
        }
    })
}

thread_local! {
    /// The last JSON reply (`tokenize`, `encode`, `lens_reduce`) on this thread.
    static REPLY_JSON: RefCell<String> = const { RefCell::new(String::new()) };
}

impl<'a> RunContext<'a> {
    /// Token ids of `text` with the checkpoint's tokenizer, loaded on first use.
    fn encode(&self, text: &str, mode: TextMode) -> Result<Vec<u32>, String> {
        let codec = self
            .codec
            .get_or_init(|| crate::codec::open(self.checkpoint).map_err(|e| e.to_string()))
            .as_ref()
            .map_err(Clone::clone)?;
        match mode {
            TextMode::Plain => codec.encode(text),
            TextMode::Chat => codec.encode_chat(text),
            TextMode::Continuation => codec.encode_continuation(text),
        }
        .map_err(|e| e.to_string())
    }

    /// Run `body` with the engine, building it on first use.
    fn with_engine<T>(
        &self,
        body: impl FnOnce(&mut Engine<'a>) -> Result<T, String>,
    ) -> Result<T, String> {
        let mut slot = self.engine.lock().unwrap_or_else(|p| p.into_inner());
        let engine = slot.get_or_insert_with(|| {
            Engine::open(self.checkpoint, self.engine_options).map_err(|e| e.to_string())
        });
        match engine {
            Ok(engine) => body(engine),
            Err(message) => Err(message.clone()),
        }
    }
}

unsafe extern "C" fn tokenize(
    ctx: *const c_void,
    text: StrRef,
    chat: bool,
    out_json: *mut StrRef,
) -> i32 {
    host_call("tokenize", abi::STATUS_ERROR, || {
        // SAFETY: the table's own ctx; the text is lent for the call.
        let (run, text) = unsafe { (context(ctx), lent(text)) };
        let mode = if chat {
            TextMode::Chat
        } else {
            TextMode::Plain
        };
        let ids = run.encode(&text, mode);
        // SAFETY: `out_json` is the caller's place for one string, or null.
        unsafe { reply_json(out_json, ids) }
    })
}

unsafe extern "C" fn encode(
    ctx: *const c_void,
    request_json: StrRef,
    out_json: *mut StrRef,
) -> i32 {
    host_call("encode", abi::STATUS_ERROR, || {
        // SAFETY: the table's own ctx; the JSON is lent for the call.
        let (run, json) = unsafe { (context(ctx), lent(request_json)) };
        let ids = serde_json::from_str::<EncodeRequest>(&json)
            .map_err(|e| format!("encode: bad request: {e}"))
            .and_then(|request| run.encode(&request.text, request.mode));
        // SAFETY: `out_json` is the caller's place for one string, or null.
        unsafe { reply_json(out_json, ids) }
    })
}

/// Write `value` as JSON to `out` through this thread's reply slot, or fail
/// with the message.
///
/// # Safety
/// `out` is null or a place for one string.
unsafe fn reply_json<T: serde::Serialize>(out: *mut StrRef, value: Result<T, String>) -> i32 {
    if out.is_null() {
        return fail("null output");
    }
    let value = match value {
        Ok(value) => value,
        Err(message) => return fail(message),
    };
    REPLY_JSON.with(|slot| {
        let mut slot = slot.borrow_mut();
        *slot = serde_json::to_string(&value).unwrap_or_default();
        // SAFETY: non-null place for one string (the caller's promise); the
        // thread-local holds the text until this thread's next reply.
        unsafe { out.write(StrRef::new(slot.as_str())) };
        abi::STATUS_OK
    })
}

/// A forward result while the plugin reads it.
struct ForwardHandle {
    meta_json: String,
    trace: Trace,
}

unsafe extern "C" fn forward_batch(
    ctx: *const c_void,
    requests_json: StrRef,
    starts: *const *const f32,
    start_lens: *const usize,
    n: usize,
    out: *mut ForwardResultC,
) -> i32 {
    host_call("forward_batch", abi::STATUS_ERROR, || {
        // SAFETY: the table's own ctx; the JSON is lent for the call.
        let (run, json) = unsafe { (context(ctx), lent(requests_json)) };
        if n > 0 && (starts.is_null() || start_lens.is_null() || out.is_null()) {
            return fail("forward_batch: null start arrays or output");
        }
        let mut requests: Vec<ForwardRequest> = match serde_json::from_str(&json) {
            Ok(requests) => requests,
            Err(e) => {
                return fail(format!(
                    "forward batch: not a JSON array of requests this probe (plugin ABI {}) understands: {e}",
                    abi::ABI_VERSION
                ))
            }
        };
        if requests.len() != n {
            return fail(format!(
                "forward batch: {} requests in the JSON, {n} announced",
                requests.len()
            ));
        }
        let mut starts_of: Vec<Option<&[f32]>> = Vec::with_capacity(n);
        for (i, request) in requests.iter_mut().enumerate() {
            if let Err(problem) = request.check() {
                let which = if n == 1 {
                    String::new()
                } else {
                    format!("request {i}: ")
                };
                return fail(format!("{which}forward request: {problem}"));
            }
            // SAFETY: the plugin passes n pointers and n lengths (checked
            // non-null above).
            let (ptr, len) = unsafe { (*starts.add(i), *start_lens.add(i)) };
            // SAFETY: a non-null start covers its length for the call.
            starts_of
                .push((!ptr.is_null()).then(|| unsafe { std::slice::from_raw_parts(ptr, len) }));
        }
        let traces = match run_requests(run, &requests, &starts_of) {
            Ok(traces) => traces,
            Err(message) => return fail(message),
        };
        for (i, trace) in traces.into_iter().enumerate() {
            // `loss` alone: the engine dropped the logits ([T, vocab], tens of MB).
            let (token_losses, loss) = trace.losses();
            let meta = ForwardMeta {
                tokens: trace.tokens.clone(),
                blocks: trace.blocks.clone(),
                hidden: trace.hidden,
                heads: trace.heads,
                vocab: trace.vocab,
                loss,
                token_losses,
                stages: trace.residuals.len(),
                updates: trace.attn_updates.len(),
                attention: trace.attention.len(),
                has_logits: trace.logits.is_some(),
                z: trace.z.len(),
            };
            let handle = Box::new(ForwardHandle {
                meta_json: serde_json::to_string(&meta).unwrap_or_default(),
                trace,
            });
            // SAFETY: the plugin passes room for one result per request
            // (checked non-null above); the handle lives until `release_forward`.
            unsafe {
                out.add(i).write(ForwardResultC {
                    meta_json: StrRef::new(&handle.meta_json),
                    handle: Box::into_raw(handle) as *mut c_void,
                })
            };
        }
        abi::STATUS_OK
    })
}

/// The requests of one call, run as one batch on the checkpoint's engine.
fn run_requests(
    run: &RunContext<'_>,
    requests: &[ForwardRequest],
    starts: &[Option<&[f32]>],
) -> Result<Vec<Trace>, String> {
    // Held for the batch: the engine reads the registered values in place.
    let registered = run.overrides.lock().unwrap_or_else(|p| p.into_inner());
    let overrides: Vec<Vec<WeightOverride<'_>>> = requests
        .iter()
        .enumerate()
        .map(|(i, request)| {
            request
                .overrides
                .iter()
                .map(|id| match registered.by_id.get(id) {
                    Some((tensor, values)) => Ok(WeightOverride { tensor, values }),
                    None => Err(format!(
                        "request {i}: override {id} is unknown (never registered, or released)"
                    )),
                })
                .collect()
        })
        .collect::<Result<_, _>>()?;
    let engine_requests: Vec<Request<'_>> = requests
        .iter()
        .zip(starts)
        .zip(&overrides)
        .map(|((request, start), overrides)| Request {
            tokens: &request.tokens,
            blocks: request.blocks.as_deref(),
            edits: &request.edits,
            start: *start,
            capture: Capture {
                residuals: request.residuals,
                updates: request.updates,
                attention: request.attention,
                logits: request.logits,
                loss: request.loss || request.logits,
                z: request.z,
            },
            loss_vocab: request.loss_vocab.as_deref(),
            branches: request.branches.as_ref(),
            overrides,
            sublayer: request.sublayer,
            kinds: request.kinds.as_deref(),
        })
        .collect();
    run.with_engine(|engine| {
        engine
            .run_batch(&engine_requests)
            .map_err(|e| e.to_string())
    })
}

unsafe extern "C" fn forward_output(
    _ctx: *const c_void,
    result: *const ForwardResultC,
    kind: u32,
    index: usize,
    out: *mut F32Buffer,
) -> i32 {
    host_call("forward_output", abi::STATUS_ERROR, || {
        // SAFETY: null or a result this host wrote.
        let Some(result) = (unsafe { result.as_ref() }) else {
            return fail("forward_output: null result");
        };
        if result.handle.is_null() || out.is_null() {
            return fail("forward_output: released result or null output");
        }
        // SAFETY: `handle` came from Box::into_raw in `forward_batch` and is
        // alive until `release_forward`.
        let handle = unsafe { &*(result.handle as *const ForwardHandle) };
        let trace = &handle.trace;
        let Some(which) = OutputKind::from_code(kind) else {
            return fail(format!("forward_output: unknown kind {kind}"));
        };
        let array: Option<&Vec<f32>> = match which {
            OutputKind::Residual => trace.residuals.get(index),
            OutputKind::AttnUpdate => trace.attn_updates.get(index),
            OutputKind::MlpUpdate => trace.mlp_updates.get(index),
            OutputKind::Attention => trace.attention.get(index),
            OutputKind::Final => Some(&trace.output),
            OutputKind::Logits => trace.logits.as_ref(),
            OutputKind::Z => trace.z.get(index),
        };
        let Some(array) = array else {
            return fail(format!(
                "forward_output: no {which:?} array at index {index} (was it requested?)"
            ));
        };
        // SAFETY: non-null place for one buffer; the array is lent until
        // `release_forward` (null owner: not for `release_f32`).
        unsafe { out.write(lend_f32(Cow::Borrowed(array))) };
        abi::STATUS_OK
    })
}

unsafe extern "C" fn release_forward(_ctx: *const c_void, result: *mut ForwardResultC) {
    host_call("release_forward", (), || {
        // SAFETY: null or a result this host wrote.
        let Some(result) = (unsafe { result.as_mut() }) else {
            return;
        };
        if !result.handle.is_null() {
            // SAFETY: from Box::into_raw in `forward_batch`; nulled below so a
            // second release does nothing.
            drop(unsafe { Box::from_raw(result.handle as *mut ForwardHandle) });
        }
        *result = ForwardResultC::empty();
    })
}

unsafe extern "C" fn lens(
    ctx: *const c_void,
    residual: *const f32,
    len: usize,
    t: usize,
    out: *mut F32Buffer,
) -> i32 {
    host_call("lens", abi::STATUS_ERROR, || {
        // SAFETY: the table's own ctx.
        let run = unsafe { context(ctx) };
        if residual.is_null() || out.is_null() {
            return fail("lens: null residual or output");
        }
        // SAFETY: non-null, `len` floats lent for the call.
        let values = unsafe { std::slice::from_raw_parts(residual, len) };
        match run.with_engine(|engine| engine.lens(values, t).map_err(|e| e.to_string())) {
            Ok(logits) => {
                // SAFETY: non-null place for one buffer; freed by `release_f32`.
                unsafe { out.write(lend_f32(Cow::Owned(logits))) };
                abi::STATUS_OK
            }
            Err(message) => fail(message),
        }
    })
}

unsafe extern "C" fn lens_reduce(
    ctx: *const c_void,
    residual: *const f32,
    len: usize,
    t: usize,
    request_json: StrRef,
    out_json: *mut StrRef,
) -> i32 {
    host_call("lens_reduce", abi::STATUS_ERROR, || {
        // SAFETY: the table's own ctx; the JSON is lent for the call.
        let (run, json) = unsafe { (context(ctx), lent(request_json)) };
        if residual.is_null() && len > 0 {
            return fail("lens_reduce: null residual");
        }
        let values = if len == 0 {
            &[][..]
        } else {
            // SAFETY: non-null, `len` floats lent for the call.
            unsafe { std::slice::from_raw_parts(residual, len) }
        };
        let reply = serde_json::from_str::<LensRequest>(&json)
            .map_err(|e| format!("lens_reduce: bad request: {e}"))
            .and_then(|request| {
                run.with_engine(|engine| {
                    engine
                        .lens_reduce(values, t, &request)
                        .map_err(|e| e.to_string())
                })
            });
        // SAFETY: `out_json` is the caller's place for one string, or null.
        unsafe { reply_json(out_json, reply) }
    })
}

unsafe extern "C" fn generate(
    ctx: *const c_void,
    request_json: StrRef,
    out_json: *mut StrRef,
) -> i32 {
    host_call("generate", abi::STATUS_ERROR, || {
        // SAFETY: the table's own ctx; the JSON is lent for the call.
        let (run, json) = unsafe { (context(ctx), lent(request_json)) };
        let reply = serde_json::from_str::<GenerateRequest>(&json)
            .map_err(|e| format!("generate: bad request: {e}"))
            .and_then(|request| {
                request
                    .check()
                    .map_err(|e| format!("generate: {e}"))
                    .map(|()| request)
            })
            .and_then(|request| {
                let prompts: Vec<&[u32]> = request.prompts.iter().map(Vec::as_slice).collect();
                run.with_engine(|engine| {
                    engine
                        .generate(&prompts, request.max_new_tokens, &request.stop)
                        .map(|completions| GenerateReply { completions })
                        .map_err(|e| e.to_string())
                })
            });
        // SAFETY: `out_json` is the caller's place for one string, or null.
        unsafe { reply_json(out_json, reply) }
    })
}

unsafe extern "C" fn override_tensor(
    ctx: *const c_void,
    name: StrRef,
    values: *const f32,
    len: usize,
    out_id: *mut u64,
) -> i32 {
    host_call("override_tensor", abi::STATUS_ERROR, || {
        // SAFETY: the table's own ctx; the name is lent for the call.
        let (run, name) = unsafe { (context(ctx), lent(name)) };
        if out_id.is_null() || (values.is_null() && len > 0) {
            return fail("override_tensor: null values or id place");
        }
        let values: &[f32] = if len == 0 {
            &[]
        } else {
            // SAFETY: non-null, and the plugin lends `len` floats for the call.
            unsafe { std::slice::from_raw_parts(values, len) }
        };
        let checked = run.with_engine(|engine| {
            engine.check_override(&WeightOverride {
                tensor: &name,
                values,
            })
        });
        if let Err(problem) = checked {
            return fail(format!("override_tensor: {problem}"));
        }
        let mut registered = run.overrides.lock().unwrap_or_else(|p| p.into_inner());
        let id = registered.next_id;
        registered.next_id += 1;
        registered
            .by_id
            .insert(id, (name.to_string(), values.to_vec()));
        // SAFETY: checked non-null; the caller's place for one id.
        unsafe { out_id.write(id) };
        abi::STATUS_OK
    })
}

unsafe extern "C" fn release_override(ctx: *const c_void, id: u64) {
    // Nothing to report: an unknown id is ignored, as documented.
    host_call("release_override", (), || {
        // SAFETY: the table's own ctx.
        let run = unsafe { context(ctx) };
        run.overrides
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .by_id
            .remove(&id);
    });
}

unsafe extern "C" fn write_reordered(ctx: *const c_void, request_json: StrRef) -> i32 {
    host_call("write_reordered", abi::STATUS_ERROR, || {
        // SAFETY: the table's own ctx; the JSON is lent for the call.
        let (run, json) = unsafe { (context(ctx), lent(request_json)) };
        let request: WriteReordered = match serde_json::from_str(&json) {
            Ok(request) => request,
            Err(e) => return fail(format!("write_reordered: bad request: {e}")),
        };
        // A config kept as it was describes positions: it stays as it is.
        let config = match request.metadata.get(crate::shuffle::CONFIG_KEY) {
            Some(kept) if kept == "kept" => crate::shuffle::BlockConfig::Kept,
            _ => crate::shuffle::BlockConfig::Moved,
        };
        match crate::shuffle::write_reordered(
            run.checkpoint,
            &request.new_index,
            config,
            request.metadata,
            &request.dir,
        ) {
            Ok(()) => abi::STATUS_OK,
            Err(e) => fail(e.to_string()),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_in_a_host_function_is_that_calls_error() {
        let status = host_call("tensor_info", abi::STATUS_ERROR, || -> i32 {
            let sizes = [3i32];
            sizes[std::hint::black_box(7)]
        });
        assert_eq!(status, abi::STATUS_ERROR);
        // SAFETY: last_error ignores its ctx and returns a thread-local string.
        let message = unsafe { last_error(std::ptr::null()).as_str() }.into_owned();
        assert!(
            message.starts_with("probe's `tensor_info` failed unexpectedly: index out of bounds"),
            "{message}"
        );
        assert!(message.contains("host_api.rs"), "{message}");
    }
}
