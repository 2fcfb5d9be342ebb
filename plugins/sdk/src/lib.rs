//! probe-sdk: write a probe plugin by implementing [`Plugin`] and calling
//! [`export_plugin!`]. The SDK turns that into the C ABI in [`abi`]: it checks
//! nothing unsafe leaks across, catches every panic at the boundary, and ships
//! your DataFrame to the host as Arrow C Data.
//!
//! ```ignore
//! use probe_sdk::prelude::*;
//!
//! struct Norms;
//! impl Plugin for Norms {
//!     const NAME: &'static str = "norms";
//!     const VERSION: &'static str = env!("CARGO_PKG_VERSION");
//!     const SUMMARY: &'static str = "Frobenius norm of every 2-D weight";
//!     fn run(host: &Host, _params: &Params, _items: &[usize]) -> Result<DataFrame, PluginError> {
//!         let mut names = Vec::new();
//!         let mut norms = Vec::new();
//!         for t in host.tensors()?.into_iter().filter(|t| t.shape.len() == 2) {
//!             let values = host.tensor_f32(t.index)?;
//!             norms.push(values.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt());
//!             names.push(t.name);
//!         }
//!         Ok(df!("tensor" => names, "frobenius" => norms)?)
//!     }
//! }
//! export_plugin!(Norms);
//! ```

#![warn(missing_docs)]

pub mod forward;
pub mod jsonl;
pub mod matrices;
pub mod prompts;
pub mod table;
pub mod validate;

use std::ffi::CString;
use std::ops::Deref;

/// The C tables and the version of the boundary (defined in `probe-contract`,
/// shared with the host).
pub use probe_contract::abi;
/// Parameter specs and the typed values a plugin reads.
pub use probe_contract::params;
pub use probe_contract::{
    Branches, Dtype, Edit, EditChange, Family, GenerateReply, GenerateRequest, Hook, LensReply,
    LensRequest, LensRow, ModelInfo, ParamError, ParamKind, ParamSpec, Params, Role, RunInfo,
    Sublayer, TensorInfo, TextMode,
};

use abi::{F32Buffer, HostApi, PluginApi, StrRef, TensorInfoC};
pub use polars;
use polars::prelude::*;

/// Everything a plugin usually needs: `use probe_sdk::prelude::*;`.
pub mod prelude {
    pub use crate::forward::{ForwardOutput, ForwardRequest, Sequence, TensorOverride};
    pub use crate::matrices::{Matrix, MatrixValues};
    pub use crate::prompts::{Prompt, PromptOptions, PromptSet};
    pub use crate::{export_plugin, Host, Plugin, PluginError};
    pub use crate::{
        Branches, Dtype, Edit, Family, Hook, LensReply, LensRequest, LensRow, ModelInfo, ParamKind,
        ParamSpec, Params, Role, RunInfo, Sublayer, TensorInfo, TextMode,
    };
    pub use polars::prelude::*;
}

/// Why a plugin call failed.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    /// A host call failed; the host's message.
    #[error("{0}")]
    Host(String),
    #[error(transparent)]
    /// A parameter could not be read.
    Params(#[from] ParamError),
    #[error(transparent)]
    /// Building the result table failed.
    Polars(#[from] PolarsError),
    /// The user asked to stop.
    #[error("cancelled")]
    Cancelled,
    #[error("{0}")]
    /// Anything else, in the plugin's words.
    Other(String),
}

impl From<String> for PluginError {
    fn from(message: String) -> Self {
        PluginError::Other(message)
    }
}

impl From<&str> for PluginError {
    fn from(message: &str) -> Self {
        PluginError::Other(message.to_string())
    }
}

/// A probe plugin. Implement it on a unit struct and call [`export_plugin!`].
pub trait Plugin {
    /// The name users type after `--plugin`.
    const NAME: &'static str;
    /// The plugin's own version (shown by `probe plugins`, recorded in
    /// every output's metadata); usually `env!("CARGO_PKG_VERSION")`.
    const VERSION: &'static str;
    /// One line for `probe plugins`.
    const SUMMARY: &'static str;
    /// What it measures, for `probe plugins info`: a few sentences, with the
    /// definitions of the columns it writes.
    const DESCRIPTION: &'static str = "";

    /// The parameters it takes. Before [`Plugin::work_items`] and
    /// [`Plugin::run`] see them, the host has typed them and filled in
    /// defaults, and the SDK has checked every [`ParamKind::Roles`] and
    /// [`ParamKind::Layers`] parameter against the model.
    fn params() -> Vec<ParamSpec> {
        Vec::new()
    }

    /// How many independent work items a checkpoint gives (`--shard` splits
    /// them; rows of the result must depend on the items alone). One by default.
    fn work_items(_host: &Host, _params: &Params) -> Result<usize, PluginError> {
        Ok(1)
    }

    /// Compute the table for these work items (ascending indices), with
    /// rows in item order.
    fn run(host: &Host, params: &Params, items: &[usize]) -> Result<DataFrame, PluginError>;
}

/// The host, as a plugin sees it during a call.
///
/// Every method is a call through the host's function table; the host never
/// unwinds into the plugin, and a failed call comes back as
/// [`PluginError::Host`] with the host's message.
pub struct Host<'a> {
    api: &'a HostApi,
}

impl<'a> Host<'a> {
    /// # Safety
    /// `api` must be null or the table the host passed to this call, valid
    /// for `'a`.
    pub unsafe fn from_raw(api: *const HostApi) -> Result<Self, PluginError> {
        // SAFETY: null or valid for 'a, as the caller promises.
        let api =
            unsafe { api.as_ref() }.ok_or_else(|| PluginError::Other("null host table".into()))?;
        if api.abi.major != abi::ABI_MAJOR || api.size < abi::HOST_API_SIZE_2_0 {
            return Err(PluginError::Other(format!(
                "this probe speaks plugin ABI {} (a table of {} bytes); this plugin was built for ABI {}",
                api.abi,
                api.size,
                abi::ABI_VERSION
            )));
        }
        Ok(Self { api })
    }

    /// The plugin ABI version of the host running this call.
    pub fn abi(&self) -> abi::AbiVersion {
        self.api.abi
    }

    fn last_error(&self) -> PluginError {
        // SAFETY: a function of the host's table, called with its own ctx;
        // the string it returns stays valid until this thread's next host
        // call, and is copied before that.
        PluginError::Host(unsafe { (self.api.last_error)(self.api.ctx).as_str() }.into_owned())
    }

    /// A JSON string the host lent for the call, copied.
    fn host_json(&self, value: StrRef) -> String {
        // SAFETY: the host lends strings that stay valid at least until this
        // thread's next host call; this copies it at once.
        unsafe { value.as_str() }.into_owned()
    }

    /// What the host knows about the model: family, sizes, config.
    pub fn model(&self) -> Result<ModelInfo, PluginError> {
        // SAFETY: a function of the host's table, called with its own ctx.
        let json = self.host_json(unsafe { (self.api.model_json)(self.api.ctx) });
        serde_json::from_str(&json).map_err(|e| PluginError::Host(format!("model facts: {e}")))
    }

    /// How forward passes run in this call: the device (`cpu`, `cuda`) and
    /// ONNX Runtime's threads, as the user chose with `probe run --device`
    /// and `--threads`. A plugin may size its batches by it.
    /// Needs a host of plugin ABI 2.1.
    pub fn run_info(&self) -> Result<RunInfo, PluginError> {
        self.api
            .require(abi::since::RUN_INFO)
            .map_err(PluginError::Host)?;
        // SAFETY: `require` checked that the host's table holds this field.
        let json = self.host_json(unsafe { (self.api.run_info)(self.api.ctx) });
        serde_json::from_str(&json).map_err(|e| PluginError::Host(format!("run facts: {e}")))
    }

    /// Every tensor, sorted by name.
    pub fn tensors(&self) -> Result<Vec<TensorInfo>, PluginError> {
        // SAFETY: a function of the host's table, called with its own ctx.
        let count = unsafe { (self.api.tensor_count)(self.api.ctx) };
        (0..count).map(|index| self.tensor_info(index)).collect()
    }

    /// One tensor by its index in [`Host::tensors`].
    pub fn tensor_info(&self, index: usize) -> Result<TensorInfo, PluginError> {
        let mut raw = TensorInfoC::empty();
        // SAFETY: a function of the host's table; `raw` is a valid place to write.
        if unsafe { (self.api.tensor_info)(self.api.ctx, index, &mut raw) } != abi::STATUS_OK {
            return Err(self.last_error());
        }
        let shape = if raw.ndim == 0 || raw.shape.is_null() {
            Vec::new()
        } else {
            // SAFETY: the host lends `ndim` dimensions that live as long as the run.
            unsafe { std::slice::from_raw_parts(raw.shape, raw.ndim) }
                .iter()
                .map(|&d| d as usize)
                .collect()
        };
        let name = self.host_json(raw.name);
        let role_name = self.host_json(raw.role);
        let dtype_name = self.host_json(raw.dtype);
        let role = Role::parse(&role_name).ok_or_else(|| {
            PluginError::Host(format!("tensor `{name}`: unknown role `{role_name}`"))
        })?;
        // A dtype named by a newer host than this SDK knows is listed as
        // `unknown` (not analysed), so an older plugin still runs.
        let dtype = Dtype::parse(&dtype_name).unwrap_or(Dtype::Other("unknown"));
        Ok(TensorInfo {
            index,
            name,
            role,
            bias: raw.bias,
            dtype,
            layer: usize::try_from(raw.layer).ok(),
            shape,
        })
    }

    /// A tensor's values as f32, lent by the host (borrowed from the mapping
    /// when the stored data already is aligned F32, converted otherwise).
    /// Dropping the result gives it back.
    ///
    /// ```ignore
    /// let t = &host.tensors()?[0];
    /// let values = host.tensor_f32(t.index)?;   // derefs to &[f32]
    /// let norm = values.iter().map(|v| v * v).sum::<f32>().sqrt();
    /// ```
    pub fn tensor_f32(&self, index: usize) -> Result<F32Tensor<'a>, PluginError> {
        let mut buffer = F32Buffer::empty();
        // SAFETY: a function of the host's table; `buffer` is a valid place to write.
        if unsafe { (self.api.tensor_f32)(self.api.ctx, index, &mut buffer) } != abi::STATUS_OK {
            return Err(self.last_error());
        }
        Ok(F32Tensor {
            api: self.api,
            buffer,
        })
    }

    /// Report progress: `done` of `total` units, on `message`.
    pub fn progress(&self, done: u64, total: u64, message: &str) {
        // SAFETY: a function of the host's table; the message is read during the call.
        unsafe { (self.api.progress)(self.api.ctx, done, total, StrRef::new(message)) }
    }

    /// True once the user asked to stop (Ctrl-C).
    pub fn cancelled(&self) -> bool {
        // SAFETY: a function of the host's table, called with its own ctx.
        unsafe { (self.api.is_cancelled)(self.api.ctx) }
    }

    /// `Err(Cancelled)` once the user asked to stop: use with `?` in loops.
    pub fn check_cancelled(&self) -> Result<(), PluginError> {
        if self.cancelled() {
            Err(PluginError::Cancelled)
        } else {
            Ok(())
        }
    }

    /// Return a second table beside the main one, e.g. a long table of
    /// values behind the main table's summary. `name` (letters, digits, `_`)
    /// becomes part of its file name: `OUT_STEM.NAME.EXT`. Rows should
    /// follow the work items, like the main table's; tables emitted under
    /// one name are stacked.
    ///
    /// ```ignore
    /// host.emit_table("singular_values", df!("index" => [0i64, 1], "sigma" => [2.0, 1.0])?)?;
    /// ```
    pub fn emit_table(&self, name: &str, frame: DataFrame) -> Result<(), PluginError> {
        let (mut schema, mut array) = table::export_frame(frame)?;
        // SAFETY: a function of the host's table; the structs are valid
        // exports that the host moves out (leaving released ones behind).
        let status = unsafe {
            (self.api.emit_table)(
                self.api.ctx,
                StrRef::new(name),
                table::c_schema(&mut schema),
                table::c_array(&mut array),
            )
        };
        if status != abi::STATUS_OK {
            return Err(self.last_error());
        }
        Ok(())
    }

    /// A line for the user (hidden by `--quiet`).
    pub fn info(&self, message: &str) {
        // SAFETY: a function of the host's table; the message is read during the call.
        unsafe { (self.api.log)(self.api.ctx, abi::LOG_INFO, StrRef::new(message)) }
    }

    /// A warning for the user (always shown).
    pub fn warn(&self, message: &str) {
        // SAFETY: a function of the host's table; the message is read during the call.
        unsafe { (self.api.log)(self.api.ctx, abi::LOG_WARN, StrRef::new(message)) }
    }

    /// The model's parts a `roles` or `layers` parameter is checked against.
    fn parts(&self) -> Result<params::ModelParts, PluginError> {
        let model = self.model()?;
        Ok(params::ModelParts {
            label: model.label,
            num_layers: model.num_layers,
            roles: self.tensors()?.into_iter().map(|t| t.role).collect(),
        })
    }
}

// SAFETY: the host promises its table and every function in it may be used
// from any thread (rayon workers call it concurrently).
unsafe impl Sync for Host<'_> {}
// SAFETY: as above.
unsafe impl Send for Host<'_> {}

/// f32 values lent by the host; given back on drop.
pub struct F32Tensor<'a> {
    api: &'a HostApi,
    buffer: F32Buffer,
}

impl Deref for F32Tensor<'_> {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        if self.buffer.data.is_null() || self.buffer.len == 0 {
            return &[];
        }
        // SAFETY: the host lent `len` floats that stay valid until release_f32 (on drop).
        unsafe { std::slice::from_raw_parts(self.buffer.data, self.buffer.len) }
    }
}

impl Drop for F32Tensor<'_> {
    fn drop(&mut self) {
        // SAFETY: gives back the buffer this host lent, once.
        unsafe { (self.api.release_f32)(self.api.ctx, &mut self.buffer) }
    }
}

// SAFETY: the lent floats are immutable and the host's release is
// callable from any thread.
unsafe impl Send for F32Tensor<'_> {}
// SAFETY: as above.
unsafe impl Sync for F32Tensor<'_> {}

/// Everything below is used by [`export_plugin!`]; plugin authors need not touch it.
#[doc(hidden)]
pub mod export {
    use super::*;

    /// The plugin's static table and the C strings it points into.
    pub struct ApiHolder {
        api: PluginApi,
        _strings: Vec<CString>,
    }

    // SAFETY: the raw pointers point into `_strings`, which lives as long as
    // the holder and is never written after construction.
    unsafe impl Sync for ApiHolder {}
    // SAFETY: as above.
    unsafe impl Send for ApiHolder {}

    fn c_string(text: &str) -> CString {
        CString::new(text.replace('\0', " ")).unwrap_or_default()
    }

    impl ApiHolder {
        pub fn new<T: Plugin>() -> Self {
            let params = serde_json::to_string(&T::params()).unwrap_or_else(|_| "[]".into());
            let strings = vec![
                c_string(T::NAME),
                c_string(T::VERSION),
                c_string(T::SUMMARY),
                c_string(T::DESCRIPTION),
                c_string(&params),
            ];
            let api = PluginApi {
                size: std::mem::size_of::<PluginApi>(),
                abi: abi::ABI_VERSION,
                name: strings[0].as_ptr(),
                version: strings[1].as_ptr(),
                summary: strings[2].as_ptr(),
                description: strings[3].as_ptr(),
                params_json: strings[4].as_ptr(),
                work_items: work_items_shim::<T>,
                run: run_shim::<T>,
            };
            Self {
                api,
                _strings: strings,
            }
        }

        pub fn api(&self) -> *const PluginApi {
            &self.api
        }
    }

    /// Run `body`, turning errors and panics into a status and a message
    /// the host reads through `set_error`.
    fn guard(host: *const HostApi, body: impl FnOnce() -> Result<(), PluginError>) -> i32 {
        let (status, message) = match probe_contract::guard::catch(body) {
            Ok(Ok(())) => return abi::STATUS_OK,
            Ok(Err(PluginError::Cancelled)) => (abi::STATUS_CANCELLED, "cancelled".to_string()),
            Ok(Err(error)) => (abi::STATUS_ERROR, error.to_string()),
            Err(panic) => (abi::STATUS_PANIC, panic),
        };
        // SAFETY: `host` is null or the table the host passed to this call.
        if let Some(api) = unsafe { host.as_ref() } {
            // SAFETY: a function of that table; the message is copied during the call.
            unsafe { (api.set_error)(api.ctx, StrRef::new(&message)) };
        }
        status
    }

    /// The host, the parameters, and the check of every selection against
    /// the model, before the plugin sees any of them.
    ///
    /// # Safety
    /// `host` is null or the table the host passed to this call; `params_json`
    /// points to readable bytes for the call.
    unsafe fn enter<'h, T: Plugin>(
        host: *const HostApi,
        params_json: StrRef,
    ) -> Result<(Host<'h>, Params), PluginError> {
        // SAFETY: as the caller promises.
        let host = unsafe { Host::from_raw(host) }?;
        // SAFETY: as the caller promises.
        let params = Params::from_json(&unsafe { params_json.as_str() })?;
        let specs = T::params();
        if specs
            .iter()
            .any(|s| matches!(s.kind, ParamKind::Roles | ParamKind::Layers))
        {
            params::check_selection(&specs, &params, &host.parts()?)?;
        }
        Ok((host, params))
    }

    /// # Safety
    /// Called by the host through the plugin table, with its own arguments.
    pub unsafe extern "C" fn work_items_shim<T: Plugin>(
        host: *const HostApi,
        params_json: StrRef,
        out_count: *mut usize,
    ) -> i32 {
        guard(host, || {
            // SAFETY: the host's own arguments.
            let (host, params) = unsafe { enter::<T>(host, params_json) }?;
            let count = T::work_items(&host, &params)?;
            if out_count.is_null() {
                return Err("null out_count".into());
            }
            // SAFETY: non-null, and the host passes a place for one count.
            unsafe { out_count.write(count) };
            Ok(())
        })
    }

    /// # Safety
    /// Called by the host through the plugin table, with its own arguments.
    pub unsafe extern "C" fn run_shim<T: Plugin>(
        host: *const HostApi,
        params_json: StrRef,
        items: *const usize,
        n_items: usize,
        out_schema: *mut abi::ArrowSchema,
        out_array: *mut abi::ArrowArray,
    ) -> i32 {
        guard(host, || {
            // SAFETY: the host's own arguments.
            let (host, params) = unsafe { enter::<T>(host, params_json) }?;
            let items = if n_items == 0 || items.is_null() {
                &[][..]
            } else {
                // SAFETY: the host passes `n_items` indices, valid for the call.
                unsafe { std::slice::from_raw_parts(items, n_items) }
            };
            let frame = T::run(&host, &params, items)?;
            let (schema, array) = table::export_frame(frame)?;
            if out_schema.is_null() || out_array.is_null() {
                return Err("null output pointers".into());
            }
            // SAFETY: non-null places the host provided for one schema and
            // one array; the host takes ownership (and releases them).
            unsafe {
                table::c_schema_out(out_schema).write(schema);
                table::c_array_out(out_array).write(array);
            }
            Ok(())
        })
    }

    /// `probe_plugin_api` without letting a panic unwind into the host.
    pub fn api_or_null(make: impl FnOnce() -> *const PluginApi) -> *const PluginApi {
        probe_contract::guard::catch(make).unwrap_or(std::ptr::null())
    }
}

/// Export a [`Plugin`] implementation as this cdylib's probe plugin.
#[macro_export]
macro_rules! export_plugin {
    ($plugin:ty) => {
        #[no_mangle]
        pub extern "C" fn probe_plugin_abi_version() -> u32 {
            $crate::abi::ABI_MAJOR
        }

        #[no_mangle]
        pub extern "C" fn probe_plugin_api() -> *const $crate::abi::PluginApi {
            static API: ::std::sync::OnceLock<$crate::export::ApiHolder> =
                ::std::sync::OnceLock::new();
            $crate::export::api_or_null(|| {
                API.get_or_init($crate::export::ApiHolder::new::<$plugin>)
                    .api()
            })
        }
    };
}
