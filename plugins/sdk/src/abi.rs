//! The C ABI between probe (the host) and a plugin (a cdylib).
//!
//! Only `#[repr(C)]` structs, function pointers, and Arrow C Data Interface
//! structs cross it; never a Rust type whose layout the compiler may change.
//!
//! Handshake, in this order:
//! 1. the host resolves [`ABI_VERSION_SYMBOL`], calls it, and refuses the
//!    library unless it returns [`ABI_VERSION`];
//! 2. the host resolves [`PLUGIN_API_SYMBOL`] and reads the [`PluginApi`]
//!    table it returns (static, owned by the plugin);
//! 3. for each checkpoint the host calls `work_items`, then `run` with a
//!    [`HostApi`] table (owned by the host, valid for the call).
//!
//! Both tables start with their own size, so either side can tell which
//! fields the other knows. Tables only grow: a field, once published, keeps
//! its place and meaning within an ABI version.

use std::ffi::{c_char, c_void};

pub use polars_arrow::ffi::{ArrowArray, ArrowSchema};

/// Bumped whenever a published field changes place or meaning.
pub const ABI_VERSION: u32 = 1;

/// `extern "C" fn() -> u32`: the ABI version the plugin was built for.
pub const ABI_VERSION_SYMBOL: &[u8] = b"probe_plugin_abi_version";
/// `extern "C" fn() -> *const PluginApi`.
pub const PLUGIN_API_SYMBOL: &[u8] = b"probe_plugin_api";

/// Status codes of calls across the boundary.
pub const STATUS_OK: i32 = 0;
/// The callee failed and reported why through `HostApi::set_error` (plugin)
/// or `HostApi::last_error` (host).
pub const STATUS_ERROR: i32 = 1;
/// The plugin panicked; the panic was caught at the boundary.
pub const STATUS_PANIC: i32 = 2;
/// The run stopped because the host asked it to (Ctrl-C).
pub const STATUS_CANCELLED: i32 = 3;

/// A borrowed UTF-8 string: pointer and length, no terminator.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct StrRef {
    pub ptr: *const u8,
    pub len: usize,
}

impl StrRef {
    pub fn new(s: &str) -> Self {
        Self {
            ptr: s.as_ptr(),
            len: s.len(),
        }
    }

    pub const fn empty() -> Self {
        Self {
            ptr: std::ptr::null(),
            len: 0,
        }
    }

    /// # Safety
    /// `ptr` must point to `len` readable bytes for the lifetime `'a`.
    pub unsafe fn as_str<'a>(&self) -> std::borrow::Cow<'a, str> {
        if self.ptr.is_null() || self.len == 0 {
            return std::borrow::Cow::Borrowed("");
        }
        let bytes = unsafe { std::slice::from_raw_parts(self.ptr, self.len) };
        String::from_utf8_lossy(bytes)
    }
}

/// One tensor of the checkpoint as the host's schema places it. The strings
/// and the shape are owned by the host and live as long as the run.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct TensorInfoC {
    pub name: StrRef,
    /// `q`, `k_bias`, `embed`, … (see the host's `Role`).
    pub role: StrRef,
    /// `F32`, `BF16`, …
    pub dtype: StrRef,
    /// Block index, or -1 outside the blocks.
    pub layer: i64,
    pub shape: *const u64,
    pub ndim: usize,
}

/// f32 values lent by the host: borrowed from the mapping when the stored
/// data already is aligned F32, converted otherwise. Give it back with
/// `HostApi::release_f32`.
#[repr(C)]
#[derive(Debug)]
pub struct F32Buffer {
    pub data: *const f32,
    pub len: usize,
    /// Host-private; null when borrowed from the mapping.
    pub owner: *mut c_void,
}

impl F32Buffer {
    pub const fn empty() -> Self {
        Self {
            data: std::ptr::null(),
            len: 0,
            owner: std::ptr::null_mut(),
        }
    }
}

/// Log levels for `HostApi::log`.
pub const LOG_INFO: u32 = 1;
pub const LOG_WARN: u32 = 2;

/// What the host offers a plugin during a call. Owned by the host; `ctx` is
/// opaque to the plugin and every function is safe to call from any thread.
#[repr(C)]
pub struct HostApi {
    /// `size_of::<HostApi>()` as the host was built.
    pub size: usize,
    pub abi_version: u32,
    pub ctx: *const c_void,
    /// The message of the last failed host call on this thread.
    pub last_error: unsafe extern "C" fn(ctx: *const c_void) -> StrRef,
    /// The plugin's reason for returning STATUS_ERROR (copied by the host).
    pub set_error: unsafe extern "C" fn(ctx: *const c_void, message: StrRef),
    /// Model facts as a JSON object: label, family, num_layers, hidden_size,
    /// vocab_size, tied_embeddings, config (config.json or null), metadata
    /// (the files' safetensors `__metadata__`, string to string).
    pub model_json: unsafe extern "C" fn(ctx: *const c_void) -> StrRef,
    pub tensor_count: unsafe extern "C" fn(ctx: *const c_void) -> usize,
    pub tensor_info:
        unsafe extern "C" fn(ctx: *const c_void, index: usize, out: *mut TensorInfoC) -> i32,
    pub tensor_f32:
        unsafe extern "C" fn(ctx: *const c_void, index: usize, out: *mut F32Buffer) -> i32,
    pub release_f32: unsafe extern "C" fn(ctx: *const c_void, buffer: *mut F32Buffer),
    /// `done` of `total` units finished; `message` says on what.
    pub progress: unsafe extern "C" fn(ctx: *const c_void, done: u64, total: u64, message: StrRef),
    /// True once the user asked to stop: the plugin should return soon.
    pub is_cancelled: unsafe extern "C" fn(ctx: *const c_void) -> bool,
    pub log: unsafe extern "C" fn(ctx: *const c_void, level: u32, message: StrRef),
    /// Hand the host a companion table (written beside the main output as
    /// `OUT_STEM.NAME.EXT`). The host moves the structs out: on return their
    /// `release` is null and the plugin must not release them.
    pub emit_table: unsafe extern "C" fn(
        ctx: *const c_void,
        name: StrRef,
        schema: *mut ArrowSchema,
        array: *mut ArrowArray,
    ) -> i32,
    /// Token ids of `text` with the checkpoint's tokenizer (under its chat
    /// template when `chat`), written as a JSON array to `out_json`; the
    /// string stays valid until this thread's next host call.
    pub tokenize: unsafe extern "C" fn(
        ctx: *const c_void,
        text: StrRef,
        chat: bool,
        out_json: *mut StrRef,
    ) -> i32,
    /// Run a forward pass. `request_json`: `{"tokens": [..], "blocks": [..] | null,
    /// "edits": [{"stage", "position", "replace" | "add": [..]}], "residuals",
    /// "updates", "attention", "logits": bool}`. On success `out` holds a
    /// host-owned result: read it with `forward_output`, free it with
    /// `release_forward`.
    pub forward: unsafe extern "C" fn(
        ctx: *const c_void,
        request_json: StrRef,
        out: *mut ForwardResultC,
    ) -> i32,
    /// One array of a forward result (`OUTPUT_*`; `index` picks the stage or
    /// block), lent until `release_forward`: do not pass it to `release_f32`.
    pub forward_output: unsafe extern "C" fn(
        ctx: *const c_void,
        result: *const ForwardResultC,
        kind: u32,
        index: usize,
        out: *mut F32Buffer,
    ) -> i32,
    pub release_forward: unsafe extern "C" fn(ctx: *const c_void, result: *mut ForwardResultC),
    /// The logit lens: final norm and unembedding applied to `t` residual rows
    /// (`len = t × hidden`). The logits `[t, vocab]` come back in `out`;
    /// give them back with `release_f32`.
    pub lens: unsafe extern "C" fn(
        ctx: *const c_void,
        residual: *const f32,
        len: usize,
        t: usize,
        out: *mut F32Buffer,
    ) -> i32,
    /// Write the checkpoint with its blocks renamed into a new folder.
    /// `request_json`: `{"dir": str, "new_index": [..], "metadata": {str: str}}`;
    /// every tensor of block `b` becomes block `new_index[b]`; the per-block
    /// config moves along, the tokenizer files are copied, `metadata` becomes
    /// the safetensors `__metadata__`. Whole or not at all.
    pub write_reordered: unsafe extern "C" fn(ctx: *const c_void, request_json: StrRef) -> i32,
    /// `forward` from a given residual `[T, hidden]` passed as raw floats
    /// (`start`, `start_len`), not in the JSON: a plugin that walks blocks
    /// one at a time passes the stream without printing and parsing it.
    pub forward_from: unsafe extern "C" fn(
        ctx: *const c_void,
        request_json: StrRef,
        start: *const f32,
        start_len: usize,
        out: *mut ForwardResultC,
    ) -> i32,
    /// Several forward passes in one call: the host stacks sequences that run
    /// the same block (with as many blocks left) into one session run, so
    /// they share one read of its weights. `requests_json` is a JSON array of
    /// `forward` requests; `starts[i]` (`start_lens[i]` floats) is request
    /// `i`'s start residual, or null. On success `out[0..n]` holds one
    /// result per request, each read with `forward_output` and freed with
    /// `release_forward`; on failure nothing was written.
    pub forward_batch: unsafe extern "C" fn(
        ctx: *const c_void,
        requests_json: StrRef,
        starts: *const *const f32,
        start_lens: *const usize,
        n: usize,
        out: *mut ForwardResultC,
    ) -> i32,
}

/// A forward pass's result, owned by the host.
#[repr(C)]
pub struct ForwardResultC {
    /// JSON: `{"tokens", "blocks", "hidden", "heads", "vocab", "loss",
    /// "token_losses", "stages", "has_logits"}`, valid until release.
    pub meta_json: StrRef,
    /// Host-private.
    pub handle: *mut c_void,
}

impl ForwardResultC {
    pub const fn empty() -> Self {
        Self {
            meta_json: StrRef::empty(),
            handle: std::ptr::null_mut(),
        }
    }
}

/// Arrays of a forward result, for `HostApi::forward_output`.
/// The residual `[T, hidden]` at stage `index` (0 = embedding output).
pub const OUTPUT_RESIDUAL: u32 = 1;
/// What block run `index` added through attention `[T, hidden]`.
pub const OUTPUT_ATTN_UPDATE: u32 = 2;
/// What block run `index` added through its MLP `[T, hidden]`.
pub const OUTPUT_MLP_UPDATE: u32 = 3;
/// Attention probabilities of block run `index` `[heads, T, T]`.
pub const OUTPUT_ATTENTION: u32 = 4;
/// The residual after the last block run `[T, hidden]`.
pub const OUTPUT_FINAL: u32 = 5;
/// Logits from the final residual `[T, vocab]`.
pub const OUTPUT_LOGITS: u32 = 6;

/// What a plugin offers. Static, owned by the plugin.
#[repr(C)]
pub struct PluginApi {
    /// `size_of::<PluginApi>()` as the plugin was built.
    pub size: usize,
    pub abi_version: u32,
    /// NUL-terminated static strings.
    pub name: *const c_char,
    pub version: *const c_char,
    pub summary: *const c_char,
    pub description: *const c_char,
    /// JSON array of parameter specs: `[{"name", "kind", "default", "help"}]`.
    pub params_json: *const c_char,
    /// How many independent work items this checkpoint gives, with these
    /// parameters (`--shard` splits them).
    pub work_items: unsafe extern "C" fn(
        host: *const HostApi,
        params_json: StrRef,
        out_count: *mut usize,
    ) -> i32,
    /// Run on the given work items (ascending indices) and write the result
    /// table as one Arrow struct array. Producer-owned: the host calls the
    /// `release` callbacks of `out_schema` and `out_array` when done.
    pub run: unsafe extern "C" fn(
        host: *const HostApi,
        params_json: StrRef,
        items: *const usize,
        n_items: usize,
        out_schema: *mut ArrowSchema,
        out_array: *mut ArrowArray,
    ) -> i32,
}

// The tables hold raw pointers to 'static or host-owned data that every
// thread may read.
unsafe impl Sync for PluginApi {}
unsafe impl Sync for HostApi {}
unsafe impl Send for HostApi {}
