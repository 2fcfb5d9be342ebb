//! The C ABI between probe (the host) and a plugin (a cdylib).
//!
//! Only `#[repr(C)]` structs, function pointers and Arrow C Data Interface
//! structs cross it; never a Rust type whose layout the compiler may change.
//!
//! Handshake, in this order:
//! 1. the host resolves [`ABI_VERSION_SYMBOL`], calls it, and refuses the
//!    library unless it returns [`ABI_MAJOR`];
//! 2. the host resolves [`PLUGIN_API_SYMBOL`] and reads the [`PluginApi`]
//!    table it returns (static, owned by the plugin);
//! 3. for each checkpoint the host calls `work_items`, then `run` with a
//!    [`HostApi`] table (owned by the host, valid for the call).
//!
//! # Versions
//! A major version changes what a published field means or where it sits;
//! hosts and plugins of different majors refuse each other, naming both.
//! A minor version only appends functions at the end of a table, or adds
//! an optional request field that the SDK refuses on an older host. A plugin
//! built against a newer minor than the host runs, until it calls a function
//! the host's table lacks: the SDK checks the table's `size` before every
//! call added after x.0 and fails that call with both versions named
//! ([`HostApi::provides`]). A plugin built against an older minor runs on a
//! newer host unchanged.
//!
//! | version | what changed |
//! |---|---|
//! | 2.0 | one typed contract crate; `forward` and `forward_from` cut (`forward_batch` is the one way to run, with raw start residuals); tensor roles as a role plus a `bias` flag |
//! | 2.1 | `HostApi::run_info`: the device and threads forward passes run with |
//! | 2.2 | `HostApi::encode` (a text as a prompt, a chat message or a continuation without special tokens) and `HostApi::lens_reduce` (the logit lens reduced in the host: entropy, top-k, target rank, KL between rows); `ForwardRequest::branches` (continuations of one prefix in one pass; the SDK refuses it on an older host, naming both versions) |
//! | 2.3 | `HostApi::generate`: greedy continuations of many prompts with a key/value cache in the host |
//! | 2.4 | `HostApi::override_tensor` and `release_override`: values that replace a stored block tensor in the forward requests that list them (`ForwardRequest::overrides`; the SDK refuses the field on an older host, naming both versions) |
//! | 2.5 | `ForwardRequest::sublayer`: each block run only its attention or its MLP, on a residual the plugin gives (no function added: the SDK refuses the field on a host older than 2.5, naming both versions) |
//! | 2.6 | `Edit::hook`: edits at a block run's attention output, MLP output or one head's output before the output projection (`Hook`), and `ForwardRequest::z` with `OutputKind::Z` to capture the head outputs (fields only: the SDK refuses them on a host older than 2.6) |
//! | 2.7 | `ForwardRequest::kinds`: a block run with another index's attention pattern and rotary table (a config that describes positions), and `ModelInfo::block_kinds` (fields only: the SDK refuses `kinds` on a host older than 2.7) |

use std::ffi::{c_char, c_void};
use std::mem::offset_of;

/// The major version: both sides must agree on it.
pub const ABI_MAJOR: u32 = 2;
/// The minor version this side was built with.
pub const ABI_MINOR: u32 = 7;
/// This side's version.
pub const ABI_VERSION: AbiVersion = AbiVersion {
    major: ABI_MAJOR,
    minor: ABI_MINOR,
};

/// `extern "C" fn() -> u32`: the ABI major version the plugin was built for.
pub const ABI_VERSION_SYMBOL: &[u8] = b"probe_plugin_abi_version";
/// `extern "C" fn() -> *const PluginApi`.
pub const PLUGIN_API_SYMBOL: &[u8] = b"probe_plugin_api";

/// An ABI version, `major.minor`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct AbiVersion {
    /// Changes when a published field changes place or meaning.
    pub major: u32,
    /// Grows when functions are appended.
    pub minor: u32,
}

impl std::fmt::Display for AbiVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// Status codes of calls across the boundary.
pub const STATUS_OK: i32 = 0;
/// The callee failed and reported why through `HostApi::set_error` (plugin)
/// or `HostApi::last_error` (host).
pub const STATUS_ERROR: i32 = 1;
/// The callee panicked; the panic was caught at the boundary.
pub const STATUS_PANIC: i32 = 2;
/// The run stopped because the host asked it to (Ctrl-C).
pub const STATUS_CANCELLED: i32 = 3;

/// The Arrow C Data Interface's `ArrowSchema`, opaque here: each side
/// creates and reads it with its own Arrow implementation (the SDK and the
/// host use polars-arrow's, whose layout is the interface's).
#[repr(C)]
pub struct ArrowSchema {
    _opaque: [u8; 0],
    _not_send: std::marker::PhantomData<(*mut u8, std::marker::PhantomPinned)>,
}

/// The Arrow C Data Interface's `ArrowArray`, opaque like [`ArrowSchema`].
#[repr(C)]
pub struct ArrowArray {
    _opaque: [u8; 0],
    _not_send: std::marker::PhantomData<(*mut u8, std::marker::PhantomPinned)>,
}

/// A borrowed UTF-8 string: pointer and length, no terminator.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct StrRef {
    /// First byte; null for an empty string.
    pub ptr: *const u8,
    /// Length in bytes.
    pub len: usize,
}

impl StrRef {
    /// Borrow `s` (valid while `s` is).
    pub fn new(s: &str) -> Self {
        Self {
            ptr: s.as_ptr(),
            len: s.len(),
        }
    }

    /// The empty string.
    pub const fn empty() -> Self {
        Self {
            ptr: std::ptr::null(),
            len: 0,
        }
    }

    /// The text; invalid UTF-8 is replaced, a null pointer reads as empty.
    ///
    /// # Safety
    /// A non-null `ptr` must point to `len` readable bytes for the lifetime `'a`.
    pub unsafe fn as_str<'a>(&self) -> std::borrow::Cow<'a, str> {
        if self.ptr.is_null() || self.len == 0 {
            return std::borrow::Cow::Borrowed("");
        }
        // SAFETY: non-null, and the caller promises `len` readable bytes.
        let bytes = unsafe { std::slice::from_raw_parts(self.ptr, self.len) };
        String::from_utf8_lossy(bytes)
    }
}

/// One tensor of the checkpoint as the host's schema places it. The strings
/// and the shape are owned by the host and live as long as the run.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct TensorInfoC {
    /// The stored tensor name.
    pub name: StrRef,
    /// A [`crate::Role`]'s name: `q`, `embed`, …
    pub role: StrRef,
    /// A bias vector of that role rather than its weight.
    pub bias: bool,
    /// A [`crate::Dtype`]'s name: `F32`, `BF16`, …
    pub dtype: StrRef,
    /// Block index, or -1 outside the blocks.
    pub layer: i64,
    /// Dimensions, outermost first (`ndim` of them).
    pub shape: *const u64,
    /// Number of dimensions.
    pub ndim: usize,
}

impl TensorInfoC {
    /// All fields empty, ready to be written by `tensor_info`.
    pub const fn empty() -> Self {
        Self {
            name: StrRef::empty(),
            role: StrRef::empty(),
            bias: false,
            dtype: StrRef::empty(),
            layer: -1,
            shape: std::ptr::null(),
            ndim: 0,
        }
    }
}

/// f32 values lent by the host: borrowed from the mapping when the stored
/// data already is aligned F32, converted otherwise. Give it back with
/// `HostApi::release_f32`.
#[repr(C)]
#[derive(Debug)]
pub struct F32Buffer {
    /// First value; null when empty.
    pub data: *const f32,
    /// Number of values.
    pub len: usize,
    /// Host-private; null when borrowed from the mapping.
    pub owner: *mut c_void,
}

impl F32Buffer {
    /// An empty buffer, ready to be written by the host.
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
/// A warning (always shown).
pub const LOG_WARN: u32 = 2;

/// A forward pass's result, owned by the host.
#[repr(C)]
pub struct ForwardResultC {
    /// JSON of a [`crate::ForwardMeta`], valid until release.
    pub meta_json: StrRef,
    /// Host-private.
    pub handle: *mut c_void,
}

impl ForwardResultC {
    /// An empty result, ready to be written by the host.
    pub const fn empty() -> Self {
        Self {
            meta_json: StrRef::empty(),
            handle: std::ptr::null_mut(),
        }
    }
}

/// What the host offers a plugin during a call. Owned by the host; `ctx` is
/// opaque to the plugin and every function is safe to call from any thread.
/// Every function returns (never unwinds); those returning a status set the
/// message `last_error` reads when they fail.
#[repr(C)]
pub struct HostApi {
    /// `size_of::<HostApi>()` as the host was built: which functions exist.
    pub size: usize,
    /// The version the host was built with.
    pub abi: AbiVersion,
    /// The host's context: pass it to every function of this table.
    pub ctx: *const c_void,
    /// The message of the last failed host call on this thread, valid until
    /// this thread's next host call.
    pub last_error: unsafe extern "C" fn(ctx: *const c_void) -> StrRef,
    /// The plugin's reason for returning STATUS_ERROR (copied by the host).
    pub set_error: unsafe extern "C" fn(ctx: *const c_void, message: StrRef),
    /// A [`crate::ModelInfo`] as JSON, valid for the call.
    pub model_json: unsafe extern "C" fn(ctx: *const c_void) -> StrRef,
    /// How many tensors the checkpoint has.
    pub tensor_count: unsafe extern "C" fn(ctx: *const c_void) -> usize,
    /// Describe tensor `index` (name order) into `out`.
    pub tensor_info:
        unsafe extern "C" fn(ctx: *const c_void, index: usize, out: *mut TensorInfoC) -> i32,
    /// Lend tensor `index`'s values as f32 into `out`; give them back with `release_f32`.
    pub tensor_f32:
        unsafe extern "C" fn(ctx: *const c_void, index: usize, out: *mut F32Buffer) -> i32,
    /// Give back a buffer from `tensor_f32` or `lens`.
    pub release_f32: unsafe extern "C" fn(ctx: *const c_void, buffer: *mut F32Buffer),
    /// `done` of `total` units finished; `message` says on what.
    pub progress: unsafe extern "C" fn(ctx: *const c_void, done: u64, total: u64, message: StrRef),
    /// True once the user asked to stop: the plugin should return soon.
    pub is_cancelled: unsafe extern "C" fn(ctx: *const c_void) -> bool,
    /// A log line (`LOG_INFO` or `LOG_WARN`).
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
    /// Run `n` forward passes in one call. `requests_json` is a JSON array of
    /// `n` [`crate::ForwardRequest`]s; `starts[i]` (`start_lens[i]` floats)
    /// is request `i`'s start residual `[T, hidden]`, or null to start from
    /// the embedding. The host stacks sequences that run the same block
    /// (with as many blocks left) into one session run. On success
    /// `out[0..n]` holds one result per request, each read with
    /// `forward_output` and freed with `release_forward`; on failure nothing
    /// was written.
    pub forward_batch: unsafe extern "C" fn(
        ctx: *const c_void,
        requests_json: StrRef,
        starts: *const *const f32,
        start_lens: *const usize,
        n: usize,
        out: *mut ForwardResultC,
    ) -> i32,
    /// One array of a forward result (a [`crate::OutputKind`] code; `index`
    /// picks the stage or block run), lent until `release_forward`: do not
    /// pass it to `release_f32`.
    pub forward_output: unsafe extern "C" fn(
        ctx: *const c_void,
        result: *const ForwardResultC,
        kind: u32,
        index: usize,
        out: *mut F32Buffer,
    ) -> i32,
    /// Free a forward result and every array it lent.
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
    /// Write the checkpoint with its blocks renamed into a new folder, as a
    /// [`crate::WriteReordered`] request in JSON. Whole or not at all.
    pub write_reordered: unsafe extern "C" fn(ctx: *const c_void, request_json: StrRef) -> i32,
    /// 2.1: a [`crate::RunInfo`] as JSON (device, threads), valid for the call.
    pub run_info: unsafe extern "C" fn(ctx: *const c_void) -> StrRef,
    /// 2.2: token ids of a [`crate::EncodeRequest`] (JSON), written as a JSON
    /// array to `out_json`; valid until this thread's next host call.
    pub encode: unsafe extern "C" fn(
        ctx: *const c_void,
        request_json: StrRef,
        out_json: *mut StrRef,
    ) -> i32,
    /// 2.2: the logit lens over `t` residual rows (`len = t × hidden`),
    /// reduced in the host as a [`crate::LensRequest`] (JSON) asks; the
    /// [`crate::LensReply`] is written as JSON to `out_json`, valid until
    /// this thread's next host call.
    pub lens_reduce: unsafe extern "C" fn(
        ctx: *const c_void,
        residual: *const f32,
        len: usize,
        t: usize,
        request_json: StrRef,
        out_json: *mut StrRef,
    ) -> i32,
    /// 2.3: greedy continuations of a [`crate::GenerateRequest`] (JSON); the
    /// [`crate::GenerateReply`] is written as JSON to `out_json`, valid until
    /// this thread's next host call.
    pub generate: unsafe extern "C" fn(
        ctx: *const c_void,
        request_json: StrRef,
        out_json: *mut StrRef,
    ) -> i32,
    /// 2.4: replace stored tensor `name` by `len` floats (its shape, in its
    /// stored orientation) in the forward requests that list the id written
    /// to `out_id` in their `overrides`. The host copies the values once and
    /// keeps them until `release_override` (or the end of the run); the
    /// checkpoint itself is never touched.
    pub override_tensor: unsafe extern "C" fn(
        ctx: *const c_void,
        name: StrRef,
        values: *const f32,
        len: usize,
        out_id: *mut u64,
    ) -> i32,
    /// 2.4: forget an override from `override_tensor` (an unknown id is ignored).
    pub release_override: unsafe extern "C" fn(ctx: *const c_void, id: u64),
}

/// Where each function of [`HostApi`] after 2.0 begins, and the minor that
/// added it: the SDK checks these before calling.
pub mod since {
    use super::*;

    /// A function that a minor version appended to [`HostApi`].
    #[derive(Clone, Copy, Debug)]
    pub struct Appended {
        /// The function's field name.
        pub name: &'static str,
        /// The minor version that appended it.
        pub minor: u32,
        /// Byte offset of the field in the table.
        pub offset: usize,
    }

    /// `HostApi::run_info`, appended in 2.1.
    pub const RUN_INFO: Appended = Appended {
        name: "run_info",
        minor: 1,
        offset: offset_of!(HostApi, run_info),
    };

    /// `HostApi::encode`, appended in 2.2.
    pub const ENCODE: Appended = Appended {
        name: "encode",
        minor: 2,
        offset: offset_of!(HostApi, encode),
    };

    /// `HostApi::lens_reduce`, appended in 2.2.
    pub const LENS_REDUCE: Appended = Appended {
        name: "lens_reduce",
        minor: 2,
        offset: offset_of!(HostApi, lens_reduce),
    };

    /// `HostApi::generate`, appended in 2.3.
    pub const GENERATE: Appended = Appended {
        name: "generate",
        minor: 3,
        offset: offset_of!(HostApi, generate),
    };

    /// `HostApi::override_tensor` (and `release_override`), appended in 2.4.
    pub const OVERRIDE_TENSOR: Appended = Appended {
        name: "override_tensor",
        minor: 4,
        offset: offset_of!(HostApi, release_override),
    };

    /// Every appended function, in table order.
    pub const ALL: [Appended; 5] = [RUN_INFO, ENCODE, LENS_REDUCE, GENERATE, OVERRIDE_TENSOR];

    /// A request field a minor version added without a function: a host
    /// says it accepts it by its table's `abi`.
    #[derive(Clone, Copy, Debug)]
    pub struct Field {
        /// The field, as a plugin writes it.
        pub name: &'static str,
        /// The minor version that added it.
        pub minor: u32,
    }

    /// `ForwardRequest::sublayer`, added in 2.5.
    pub const SUBLAYER: Field = Field {
        name: "ForwardRequest::sublayer",
        minor: 5,
    };

    /// `Edit::hook` and `ForwardRequest::z`, added in 2.6.
    pub const HOOKS: Field = Field {
        name: "Edit::hook",
        minor: 6,
    };

    /// `ForwardRequest::kinds` and `ModelInfo::block_kinds`, added in 2.7.
    pub const KINDS: Field = Field {
        name: "ForwardRequest::kinds",
        minor: 7,
    };

    /// Every field added without a function, oldest first.
    pub const FIELDS: [Field; 3] = [SUBLAYER, HOOKS, KINDS];
}

/// The size of a 2.0 host table: every field before the first appended one.
pub const HOST_API_SIZE_2_0: usize = offset_of!(HostApi, run_info);

impl HostApi {
    /// Whether this table (as its `size` says) holds the appended function.
    pub fn provides(&self, function: since::Appended) -> bool {
        let end = function.offset + std::mem::size_of::<unsafe extern "C" fn()>();
        self.size >= end
    }

    /// `Ok` when this host (by its table's version) accepts `field`, else the
    /// error a plugin reports: both versions and what to do.
    pub fn require_field(&self, field: since::Field) -> Result<(), String> {
        if self.abi.major == ABI_MAJOR && self.abi.minor >= field.minor {
            return Ok(());
        }
        Err(format!(
            "this plugin uses `{}` (plugin ABI {}.{}), which this probe (plugin ABI {}) lacks: update probe, or rebuild the plugin against an SDK of ABI {}",
            field.name, ABI_MAJOR, field.minor, self.abi, self.abi,
        ))
    }

    /// `Ok` when the table holds `function`, else the error a plugin reports:
    /// both versions and what to do.
    pub fn require(&self, function: since::Appended) -> Result<(), String> {
        if self.provides(function) {
            return Ok(());
        }
        Err(format!(
            "this plugin calls `{}` (plugin ABI {}.{}), which this probe (plugin ABI {}) lacks: update probe, or rebuild the plugin against an SDK of ABI {}",
            function.name,
            ABI_MAJOR,
            function.minor,
            self.abi,
            self.abi,
        ))
    }
}

/// What a plugin offers. Static, owned by the plugin.
#[repr(C)]
pub struct PluginApi {
    /// `size_of::<PluginApi>()` as the plugin was built.
    pub size: usize,
    /// The version the plugin was built against.
    pub abi: AbiVersion,
    /// NUL-terminated static strings.
    pub name: *const c_char,
    /// The plugin's own version.
    pub version: *const c_char,
    /// One line for `probe plugins`.
    pub summary: *const c_char,
    /// What it measures, for `probe plugins info`.
    pub description: *const c_char,
    /// JSON array of [`crate::ParamSpec`]s.
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

// SAFETY: the tables hold function pointers and raw pointers to 'static
// (plugin) or call-long (host) data that is never written through them;
// every function in them is documented safe to call from any thread.
unsafe impl Sync for PluginApi {}
// SAFETY: as above.
unsafe impl Sync for HostApi {}
// SAFETY: as above; `ctx` points to a host context that is itself Sync.
unsafe impl Send for HostApi {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_2_0_table_lacks_run_info_and_says_which_versions() {
        assert!(HOST_API_SIZE_2_0 < std::mem::size_of::<HostApi>());
        assert_eq!(since::RUN_INFO.offset, HOST_API_SIZE_2_0);
        let last = since::ALL[since::ALL.len() - 1];
        assert_eq!(
            last.offset + std::mem::size_of::<usize>(),
            std::mem::size_of::<HostApi>(),
            "a new appended function needs its own `since` entry, last in `since::ALL`"
        );
        for pair in since::ALL.windows(2) {
            assert!(pair[0].offset < pair[1].offset && pair[0].minor <= pair[1].minor);
        }
        let newest_field = since::FIELDS.iter().map(|f| f.minor).max().unwrap_or(0);
        assert_eq!(
            last.minor.max(newest_field),
            ABI_MINOR,
            "the last function appended, or the last field added, sets the minor"
        );
    }

    /// A host table with every function a stub, as a host of `size` bytes
    /// would present it.
    fn stub_table(size: usize, minor: u32) -> HostApi {
        unsafe extern "C" fn text(_: *const c_void) -> StrRef {
            StrRef::empty()
        }
        unsafe extern "C" fn message(_: *const c_void, _: StrRef) {}
        unsafe extern "C" fn count(_: *const c_void) -> usize {
            0
        }
        unsafe extern "C" fn info(_: *const c_void, _: usize, _: *mut TensorInfoC) -> i32 {
            STATUS_ERROR
        }
        unsafe extern "C" fn values(_: *const c_void, _: usize, _: *mut F32Buffer) -> i32 {
            STATUS_ERROR
        }
        unsafe extern "C" fn release(_: *const c_void, _: *mut F32Buffer) {}
        unsafe extern "C" fn progress(_: *const c_void, _: u64, _: u64, _: StrRef) {}
        unsafe extern "C" fn cancelled(_: *const c_void) -> bool {
            false
        }
        unsafe extern "C" fn log(_: *const c_void, _: u32, _: StrRef) {}
        unsafe extern "C" fn emit(
            _: *const c_void,
            _: StrRef,
            _: *mut ArrowSchema,
            _: *mut ArrowArray,
        ) -> i32 {
            STATUS_ERROR
        }
        unsafe extern "C" fn tokenize(_: *const c_void, _: StrRef, _: bool, _: *mut StrRef) -> i32 {
            STATUS_ERROR
        }
        unsafe extern "C" fn batch(
            _: *const c_void,
            _: StrRef,
            _: *const *const f32,
            _: *const usize,
            _: usize,
            _: *mut ForwardResultC,
        ) -> i32 {
            STATUS_ERROR
        }
        unsafe extern "C" fn output(
            _: *const c_void,
            _: *const ForwardResultC,
            _: u32,
            _: usize,
            _: *mut F32Buffer,
        ) -> i32 {
            STATUS_ERROR
        }
        unsafe extern "C" fn release_result(_: *const c_void, _: *mut ForwardResultC) {}
        unsafe extern "C" fn lens(
            _: *const c_void,
            _: *const f32,
            _: usize,
            _: usize,
            _: *mut F32Buffer,
        ) -> i32 {
            STATUS_ERROR
        }
        unsafe extern "C" fn write(_: *const c_void, _: StrRef) -> i32 {
            STATUS_ERROR
        }
        unsafe extern "C" fn encode(_: *const c_void, _: StrRef, _: *mut StrRef) -> i32 {
            STATUS_ERROR
        }
        unsafe extern "C" fn lens_reduce(
            _: *const c_void,
            _: *const f32,
            _: usize,
            _: usize,
            _: StrRef,
            _: *mut StrRef,
        ) -> i32 {
            STATUS_ERROR
        }
        unsafe extern "C" fn override_tensor(
            _: *const c_void,
            _: StrRef,
            _: *const f32,
            _: usize,
            _: *mut u64,
        ) -> i32 {
            STATUS_ERROR
        }
        unsafe extern "C" fn release_override(_: *const c_void, _: u64) {}
        HostApi {
            size,
            abi: AbiVersion {
                major: ABI_MAJOR,
                minor,
            },
            ctx: std::ptr::null(),
            last_error: text,
            set_error: message,
            model_json: text,
            tensor_count: count,
            tensor_info: info,
            tensor_f32: values,
            release_f32: release,
            progress,
            is_cancelled: cancelled,
            log,
            emit_table: emit,
            tokenize,
            forward_batch: batch,
            forward_output: output,
            release_forward: release_result,
            lens,
            write_reordered: write,
            run_info: text,
            encode,
            lens_reduce,
            generate: encode,
            override_tensor,
            release_override,
        }
    }

    #[test]
    fn a_newer_plugin_on_an_older_host_fails_the_call_naming_both_versions() {
        let old = stub_table(HOST_API_SIZE_2_0, 0);
        assert!(!old.provides(since::RUN_INFO));
        assert_eq!(
            old.require(since::RUN_INFO).unwrap_err(),
            "this plugin calls `run_info` (plugin ABI 2.1), which this probe (plugin ABI 2.0) lacks: update probe, or rebuild the plugin against an SDK of ABI 2.0"
        );
        let current = stub_table(std::mem::size_of::<HostApi>(), ABI_MINOR);
        assert!(since::ALL.iter().all(|&f| current.require(f).is_ok()));
        let a_2_1 = stub_table(since::ENCODE.offset, 1);
        assert!(a_2_1.provides(since::RUN_INFO));
        assert_eq!(
            a_2_1.require(since::LENS_REDUCE).unwrap_err(),
            "this plugin calls `lens_reduce` (plugin ABI 2.2), which this probe (plugin ABI 2.1) lacks: update probe, or rebuild the plugin against an SDK of ABI 2.1"
        );
        // A field added without a function: the table's version decides.
        assert!(since::FIELDS
            .iter()
            .all(|&f| current.require_field(f).is_ok()));
        let a_2_4 = stub_table(std::mem::size_of::<HostApi>(), 4);
        assert_eq!(
            a_2_4.require_field(since::SUBLAYER).unwrap_err(),
            "this plugin uses `ForwardRequest::sublayer` (plugin ABI 2.5), which this probe (plugin ABI 2.4) lacks: update probe, or rebuild the plugin against an SDK of ABI 2.4"
        );
    }

    #[test]
    fn versions_print_as_major_dot_minor() {
        assert_eq!(ABI_VERSION.to_string(), format!("{ABI_MAJOR}.{ABI_MINOR}"));
        assert!(AbiVersion { major: 2, minor: 0 } < AbiVersion { major: 2, minor: 1 });
    }
}
