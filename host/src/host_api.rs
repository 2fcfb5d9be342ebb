//! The host's side of the plugin ABI: the function table a plugin calls
//! during a run, over one open checkpoint.
//!
//! Every function here is `extern "C"` and is called from plugin code, so
//! none may unwind: each body runs under `catch_unwind`, and failures become
//! a status plus a message the plugin reads with `last_error`.

use std::borrow::Cow;
use std::cell::RefCell;
use std::ffi::c_void;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use polars::prelude::DataFrame;
use probe_sdk::abi::{
    self, ArrowArray, ArrowSchema, F32Buffer, ForwardResultC, HostApi, StrRef, TensorInfoC,
};

use crate::forward::text::TextCodec;
use crate::forward::{Capture, EditKind, Engine, EngineOptions, Request, ResidualEdit, Trace};

use crate::plugin::LoadedPlugin;
use crate::progress::Progress;
use crate::schema::Schema;
use crate::store::Checkpoint;

/// Everything a plugin may reach during one call on one checkpoint.
pub struct RunContext<'a> {
    checkpoint: &'a Checkpoint,
    model_json: String,
    roles: Vec<String>,
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
    pub fn new(checkpoint: &'a Checkpoint, progress: &'a Progress, cancel: &'a AtomicBool) -> Self {
        let schema = Schema::of(checkpoint);
        let model_json = serde_json::json!({
            "label": checkpoint.label,
            "family": schema.family.as_str(),
            "num_layers": schema.num_layers,
            "hidden_size": schema.hidden_size,
            "vocab_size": schema.vocab_size,
            "tied_embeddings": schema.tied_embeddings,
            "config": checkpoint.config,
            "metadata": checkpoint.user_metadata(),
        })
        .to_string();
        Self {
            checkpoint,
            model_json,
            roles: schema.placements.iter().map(|p| p.role_name()).collect(),
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
            engine_options: EngineOptions::default(),
            codec: std::sync::OnceLock::new(),
        }
    }

    /// Where forward passes run for this plugin call.
    pub fn with_engine_options(mut self, options: EngineOptions) -> Self {
        self.engine_options = options;
        self
    }

    fn api(&self) -> HostApi {
        HostApi {
            size: std::mem::size_of::<HostApi>(),
            abi_version: abi::ABI_VERSION,
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
            forward,
            forward_output,
            release_forward,
            lens,
            write_reordered,
            forward_from,
            forward_batch,
        }
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
        let mut schema = ArrowSchema::empty();
        let mut array = ArrowArray::empty();
        let status = unsafe {
            (plugin.api.run)(
                &api,
                StrRef::new(params_json),
                items.as_ptr(),
                items.len(),
                &mut schema,
                &mut array,
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

/// Run `body` without letting a panic cross into the plugin.
fn shielded<T>(fallback: T, body: impl FnOnce() -> T) -> T {
    catch_unwind(AssertUnwindSafe(body)).unwrap_or(fallback)
}

fn fail(message: impl Into<String>) -> i32 {
    LAST_ERROR.with(|slot| *slot.borrow_mut() = message.into());
    abi::STATUS_ERROR
}

/// # Safety
/// `ctx` is the pointer `RunContext::api` put in the table.
unsafe fn context<'a>(ctx: *const c_void) -> &'a RunContext<'a> {
    unsafe { &*(ctx as *const RunContext<'a>) }
}

unsafe extern "C" fn last_error(_ctx: *const c_void) -> StrRef {
    // The pointer stays valid until this thread's next failing host call.
    LAST_ERROR.with(|slot| StrRef::new(slot.borrow().as_str()))
}

unsafe extern "C" fn set_error(ctx: *const c_void, message: StrRef) {
    shielded((), || {
        let run = unsafe { context(ctx) };
        let text = unsafe { message.as_str() }.into_owned();
        *run.plugin_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(text);
    })
}

unsafe extern "C" fn model_json(ctx: *const c_void) -> StrRef {
    shielded(StrRef::empty(), || {
        StrRef::new(&unsafe { context(ctx) }.model_json)
    })
}

unsafe extern "C" fn tensor_count(ctx: *const c_void) -> usize {
    shielded(0, || unsafe { context(ctx) }.checkpoint.tensors().len())
}

unsafe extern "C" fn tensor_info(ctx: *const c_void, index: usize, out: *mut TensorInfoC) -> i32 {
    shielded(abi::STATUS_ERROR, || {
        let run = unsafe { context(ctx) };
        let Some(entry) = run.checkpoint.tensors().get(index) else {
            return fail(format!("no tensor with index {index}"));
        };
        if out.is_null() {
            return fail("tensor_info: null output");
        }
        let shape = &run.shapes[index];
        unsafe {
            out.write(TensorInfoC {
                name: StrRef::new(&entry.name),
                role: StrRef::new(&run.roles[index]),
                dtype: StrRef::new(entry.dtype.as_str()),
                layer: run.layers[index],
                shape: shape.as_ptr(),
                ndim: shape.len(),
            })
        };
        abi::STATUS_OK
    })
}

unsafe extern "C" fn tensor_f32(ctx: *const c_void, index: usize, out: *mut F32Buffer) -> i32 {
    shielded(abi::STATUS_ERROR, || {
        let run = unsafe { context(ctx) };
        let Some(entry) = run.checkpoint.tensors().get(index) else {
            return fail(format!("no tensor with index {index}"));
        };
        if out.is_null() {
            return fail("tensor_f32: null output");
        }
        let values = match run.checkpoint.view(entry).to_f32() {
            Ok(values) => values,
            Err(error) => return fail(error.to_string()),
        };
        let buffer = match values {
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
        };
        unsafe { out.write(buffer) };
        abi::STATUS_OK
    })
}

unsafe extern "C" fn release_f32(_ctx: *const c_void, buffer: *mut F32Buffer) {
    shielded((), || {
        let Some(buffer) = (unsafe { buffer.as_mut() }) else {
            return;
        };
        if !buffer.owner.is_null() {
            // SAFETY: `owner` came from Box::into_raw in tensor_f32.
            drop(unsafe { Box::from_raw(buffer.owner as *mut Vec<f32>) });
        }
        *buffer = F32Buffer::empty();
    })
}

unsafe extern "C" fn progress(ctx: *const c_void, done: u64, total: u64, message: StrRef) {
    shielded((), || {
        let run = unsafe { context(ctx) };
        run.progress
            .update(done, total, &unsafe { message.as_str() });
    })
}

unsafe extern "C" fn is_cancelled(ctx: *const c_void) -> bool {
    shielded(true, || {
        unsafe { context(ctx) }.cancel.load(Ordering::Relaxed)
    })
}

unsafe extern "C" fn log(ctx: *const c_void, level: u32, message: StrRef) {
    shielded((), || {
        let run = unsafe { context(ctx) };
        run.progress
            .log(level == abi::LOG_WARN, &unsafe { message.as_str() });
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
    shielded(abi::STATUS_ERROR, || {
        let run = unsafe { context(ctx) };
        let name = unsafe { name.as_str() }.into_owned();
        if !is_companion_name(&name) {
            return fail(format!("table name `{name}` must be letters, digits and _"));
        }
        if schema.is_null() || array.is_null() {
            return fail("emit_table: null table");
        }
        // Move the structs out, leaving released (empty) ones behind.
        let (schema, array) = unsafe {
            (
                std::ptr::replace(schema, ArrowSchema::empty()),
                std::ptr::replace(array, ArrowArray::empty()),
            )
        };
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
    /// The last token ids `tokenize` returned on this thread, as JSON.
    static TOKENS_JSON: RefCell<String> = const { RefCell::new(String::new()) };
}

impl<'a> RunContext<'a> {
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
    shielded(abi::STATUS_ERROR, || {
        let run = unsafe { context(ctx) };
        if out_json.is_null() {
            return fail("tokenize: null output");
        }
        let codec = run
            .codec
            .get_or_init(|| TextCodec::open(&run.checkpoint.dir).map_err(|e| e.to_string()));
        let codec = match codec {
            Ok(codec) => codec,
            Err(message) => return fail(message.clone()),
        };
        let text = unsafe { text.as_str() };
        let ids = if chat {
            codec.encode_chat(&text)
        } else {
            codec.encode(&text)
        };
        match ids {
            Ok(ids) => TOKENS_JSON.with(|slot| {
                let mut slot = slot.borrow_mut();
                *slot = serde_json::to_string(&ids).unwrap_or_default();
                unsafe { out_json.write(StrRef::new(slot.as_str())) };
                abi::STATUS_OK
            }),
            Err(e) => fail(e.to_string()),
        }
    })
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ForwardRequestJson {
    tokens: Vec<u32>,
    #[serde(default)]
    blocks: Option<Vec<usize>>,
    #[serde(default)]
    edits: Vec<EditJson>,
    #[serde(default)]
    residuals: bool,
    #[serde(default)]
    updates: bool,
    #[serde(default)]
    attention: bool,
    #[serde(default)]
    logits: bool,
    #[serde(default)]
    loss: bool,
    #[serde(default)]
    start: Option<Vec<f32>>,
    #[serde(default)]
    loss_vocab: Option<Vec<u32>>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct EditJson {
    stage: usize,
    position: usize,
    #[serde(default)]
    replace: Option<Vec<f32>>,
    #[serde(default)]
    add: Option<Vec<f32>>,
}

/// A forward result while the plugin reads it.
struct ForwardHandle {
    meta_json: String,
    trace: Trace,
}

/// A forward request as parsed from JSON, with its edits.
type ParsedRequest = (ForwardRequestJson, Vec<ResidualEdit>);

fn parse_request(json: &str) -> Result<ParsedRequest, String> {
    let value = serde_json::from_str(json).map_err(|e| format!("forward request: {e}"))?;
    parse_request_value(value)
}

fn parse_request_value(value: serde_json::Value) -> Result<ParsedRequest, String> {
    let request: ForwardRequestJson =
        serde_json::from_value(value).map_err(|e| format!("forward request: {e}"))?;
    let edits = request
        .edits
        .iter()
        .map(|e| {
            let kind = match (&e.replace, &e.add) {
                (Some(v), None) => EditKind::Replace(v.clone()),
                (None, Some(v)) => EditKind::Add(v.clone()),
                _ => {
                    return Err(
                        "forward request: an edit needs exactly one of `replace` and `add`"
                            .to_string(),
                    )
                }
            };
            Ok(ResidualEdit {
                stage: e.stage,
                position: e.position,
                kind,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((request, edits))
}

unsafe extern "C" fn forward(
    ctx: *const c_void,
    request_json: StrRef,
    out: *mut ForwardResultC,
) -> i32 {
    shielded(abi::STATUS_ERROR, || {
        let run = unsafe { context(ctx) };
        let json = unsafe { request_json.as_str() };
        let request = match parse_request(&json) {
            Ok(parsed) => parsed,
            Err(message) => return fail(message),
        };
        run_forwards(run, vec![(request, None)], out)
    })
}

unsafe extern "C" fn forward_from(
    ctx: *const c_void,
    request_json: StrRef,
    start: *const f32,
    start_len: usize,
    out: *mut ForwardResultC,
) -> i32 {
    shielded(abi::STATUS_ERROR, || {
        let run = unsafe { context(ctx) };
        if start.is_null() {
            return fail("forward_from: null start residual");
        }
        let json = unsafe { request_json.as_str() };
        let start = unsafe { std::slice::from_raw_parts(start, start_len) };
        let request = match parse_request(&json) {
            Ok(parsed) => parsed,
            Err(message) => return fail(message),
        };
        run_forwards(run, vec![(request, Some(start))], out)
    })
}

unsafe extern "C" fn forward_batch(
    ctx: *const c_void,
    requests_json: StrRef,
    starts: *const *const f32,
    start_lens: *const usize,
    n: usize,
    out: *mut ForwardResultC,
) -> i32 {
    shielded(abi::STATUS_ERROR, || {
        let run = unsafe { context(ctx) };
        if n > 0 && (starts.is_null() || start_lens.is_null()) {
            return fail("forward_batch: null start arrays");
        }
        let json = unsafe { requests_json.as_str() };
        let values: Vec<serde_json::Value> = match serde_json::from_str(&json) {
            Ok(values) => values,
            Err(e) => return fail(format!("forward batch: not a JSON array of requests: {e}")),
        };
        if values.len() != n {
            return fail(format!(
                "forward batch: {} requests in the JSON, {n} announced",
                values.len()
            ));
        }
        let mut requests = Vec::with_capacity(n);
        for (i, value) in values.into_iter().enumerate() {
            let request = match parse_request_value(value) {
                Ok(parsed) => parsed,
                Err(message) => return fail(format!("request {i}: {message}")),
            };
            // SAFETY: the plugin passes n pointers and n lengths; a non-null
            // pointer covers its length for the call.
            let (ptr, len) = unsafe { (*starts.add(i), *start_lens.add(i)) };
            let start = (!ptr.is_null()).then(|| unsafe { std::slice::from_raw_parts(ptr, len) });
            requests.push((request, start));
        }
        run_forwards(run, requests, out)
    })
}

/// The forward requests of one call, run as one batch; `out` receives one
/// result per request, or nothing on failure. A raw `start` overrides the
/// JSON's (which must then be absent).
fn run_forwards(
    run: &RunContext<'_>,
    requests: Vec<(ParsedRequest, Option<&[f32]>)>,
    out: *mut ForwardResultC,
) -> i32 {
    if out.is_null() {
        return fail("forward: null output");
    }
    for (i, ((request, _), start)) in requests.iter().enumerate() {
        let which = if requests.len() == 1 {
            String::new()
        } else {
            format!("request {i}: ")
        };
        if start.is_some() && request.start.is_some() {
            return fail(format!(
                "{which}forward_from: the start residual is given twice (raw and in the JSON)"
            ));
        }
        if request.loss_vocab.is_some() && (request.logits || !request.loss) {
            return fail(format!(
                "{which}forward request: `loss_vocab` restricts the loss; ask for `loss` and not `logits`"
            ));
        }
    }
    let engine_requests: Vec<Request<'_>> = requests
        .iter()
        .map(|((request, edits), start)| Request {
            tokens: &request.tokens,
            blocks: request.blocks.as_deref(),
            edits,
            start: start.or(request.start.as_deref()),
            capture: Capture {
                residuals: request.residuals,
                updates: request.updates,
                attention: request.attention,
                logits: request.logits,
                loss: request.loss || request.logits,
            },
            loss_vocab: request.loss_vocab.as_deref(),
        })
        .collect();
    let result = run.with_engine(|engine| {
        engine
            .run_batch(&engine_requests)
            .map_err(|e| e.to_string())
    });
    let traces = match result {
        Ok(traces) => traces,
        Err(message) => return fail(message),
    };
    for (i, trace) in traces.into_iter().enumerate() {
        // `loss` alone: the engine dropped the logits ([T, vocab], tens of MB).
        let (token_losses, loss) = trace.losses();
        let meta_json = serde_json::json!({
            "tokens": trace.tokens,
            "blocks": trace.blocks,
            "hidden": trace.hidden,
            "heads": trace.heads,
            "vocab": trace.vocab,
            "loss": loss,
            "token_losses": token_losses,
            "stages": trace.residuals.len(),
            "updates": trace.attn_updates.len(),
            "attention": trace.attention.len(),
            "has_logits": trace.logits.is_some(),
        })
        .to_string();
        let handle = Box::new(ForwardHandle { meta_json, trace });
        // SAFETY: the caller passes room for one result per request.
        unsafe {
            out.add(i).write(ForwardResultC {
                meta_json: StrRef::new(&handle.meta_json),
                handle: Box::into_raw(handle) as *mut c_void,
            })
        };
    }
    abi::STATUS_OK
}

unsafe extern "C" fn forward_output(
    _ctx: *const c_void,
    result: *const ForwardResultC,
    kind: u32,
    index: usize,
    out: *mut F32Buffer,
) -> i32 {
    shielded(abi::STATUS_ERROR, || {
        let Some(result) = (unsafe { result.as_ref() }) else {
            return fail("forward_output: null result");
        };
        if result.handle.is_null() || out.is_null() {
            return fail("forward_output: released result or null output");
        }
        // SAFETY: `handle` came from Box::into_raw in `forward` and is alive
        // until `release_forward`.
        let handle = unsafe { &*(result.handle as *const ForwardHandle) };
        let trace = &handle.trace;
        let array: Option<&Vec<f32>> = match kind {
            abi::OUTPUT_RESIDUAL => trace.residuals.get(index),
            abi::OUTPUT_ATTN_UPDATE => trace.attn_updates.get(index),
            abi::OUTPUT_MLP_UPDATE => trace.mlp_updates.get(index),
            abi::OUTPUT_ATTENTION => trace.attention.get(index),
            abi::OUTPUT_FINAL => Some(&trace.output),
            abi::OUTPUT_LOGITS => trace.logits.as_ref(),
            other => return fail(format!("forward_output: unknown kind {other}")),
        };
        let Some(array) = array else {
            return fail(format!(
                "forward_output: no array of kind {kind} at index {index} (was it requested?)"
            ));
        };
        unsafe {
            out.write(F32Buffer {
                data: array.as_ptr(),
                len: array.len(),
                owner: std::ptr::null_mut(),
            })
        };
        abi::STATUS_OK
    })
}

unsafe extern "C" fn release_forward(_ctx: *const c_void, result: *mut ForwardResultC) {
    shielded((), || {
        let Some(result) = (unsafe { result.as_mut() }) else {
            return;
        };
        if !result.handle.is_null() {
            // SAFETY: from Box::into_raw in `forward`; nulled below so a second
            // release does nothing.
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
    shielded(abi::STATUS_ERROR, || {
        let run = unsafe { context(ctx) };
        if residual.is_null() || out.is_null() {
            return fail("lens: null residual or output");
        }
        let values = unsafe { std::slice::from_raw_parts(residual, len) };
        match run.with_engine(|engine| engine.lens(values, t).map_err(|e| e.to_string())) {
            Ok(logits) => {
                let boxed = Box::new(logits);
                unsafe {
                    out.write(F32Buffer {
                        data: boxed.as_ptr(),
                        len: boxed.len(),
                        owner: Box::into_raw(boxed) as *mut c_void,
                    })
                };
                abi::STATUS_OK
            }
            Err(message) => fail(message),
        }
    })
}

unsafe extern "C" fn write_reordered(ctx: *const c_void, request_json: StrRef) -> i32 {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct WriteRequest {
        dir: std::path::PathBuf,
        new_index: Vec<usize>,
        #[serde(default)]
        metadata: std::collections::BTreeMap<String, String>,
    }
    shielded(abi::STATUS_ERROR, || {
        let run = unsafe { context(ctx) };
        let json = unsafe { request_json.as_str() };
        let request: WriteRequest = match serde_json::from_str(&json) {
            Ok(request) => request,
            Err(e) => return fail(format!("write_reordered: bad request: {e}")),
        };
        match crate::shuffle::write_reordered(
            run.checkpoint,
            &request.new_index,
            request.metadata,
            &request.dir,
        ) {
            Ok(()) => abi::STATUS_OK,
            Err(e) => fail(e.to_string()),
        }
    })
}
