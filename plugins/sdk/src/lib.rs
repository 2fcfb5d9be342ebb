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

pub mod abi;
pub mod forward;
pub mod matrices;
pub mod params;
pub mod table;
pub mod validate;

use std::cell::RefCell;
use std::ffi::CString;
use std::ops::Deref;
use std::panic::{catch_unwind, AssertUnwindSafe};

use abi::{F32Buffer, HostApi, PluginApi, StrRef, TensorInfoC};
pub use params::{ParamError, ParamKind, ParamSpec, Params};
pub use polars;
use polars::prelude::*;
use serde::Deserialize;

pub mod prelude {
    pub use crate::forward::{Edit, ForwardOutput, ForwardRequest};
    pub use crate::matrices::{Matrix, MatrixValues};
    pub use crate::params::{ParamKind, ParamSpec, Params};
    pub use crate::{export_plugin, Host, ModelInfo, Plugin, PluginError, TensorInfo};
    pub use polars::prelude::*;
}

/// Why a plugin call failed.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    /// A host call failed; the host's message.
    #[error("{0}")]
    Host(String),
    #[error(transparent)]
    Params(#[from] ParamError),
    #[error(transparent)]
    Polars(#[from] PolarsError),
    /// The user asked to stop.
    #[error("cancelled")]
    Cancelled,
    #[error("{0}")]
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
    const VERSION: &'static str;
    /// One line for `probe plugins`.
    const SUMMARY: &'static str;
    /// What it measures, for `probe plugins info`.
    const DESCRIPTION: &'static str = "";

    /// The parameters it takes.
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

/// Model facts the host knows.
#[derive(Clone, Debug, Deserialize)]
pub struct ModelInfo {
    pub label: String,
    pub family: String,
    pub num_layers: usize,
    pub hidden_size: Option<usize>,
    pub vocab_size: Option<usize>,
    pub tied_embeddings: bool,
    /// `config.json`, when the checkpoint has one.
    pub config: Option<serde_json::Value>,
    /// The safetensors `__metadata__` of the checkpoint's files (e.g. the
    /// permutation `probe shuffle` records); empty from older hosts.
    #[serde(default)]
    pub metadata: std::collections::BTreeMap<String, String>,
}

/// One tensor as the host places it.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    /// Pass to [`Host::tensor_f32`].
    pub index: usize,
    pub name: String,
    pub role: String,
    pub dtype: String,
    pub layer: Option<usize>,
    pub shape: Vec<usize>,
}

/// The host, as a plugin sees it during a call.
pub struct Host<'a> {
    api: &'a HostApi,
}

impl<'a> Host<'a> {
    /// # Safety
    /// `api` must be the valid table the host passed to this call.
    pub unsafe fn from_raw(api: *const HostApi) -> Result<Self, PluginError> {
        let api =
            unsafe { api.as_ref() }.ok_or_else(|| PluginError::Other("null host table".into()))?;
        if api.abi_version != abi::ABI_VERSION || api.size < std::mem::size_of::<HostApi>() {
            return Err(PluginError::Other(format!(
                "host speaks plugin ABI {} (table of {} bytes); this plugin needs ABI {}",
                api.abi_version,
                api.size,
                abi::ABI_VERSION
            )));
        }
        Ok(Self { api })
    }

    fn last_error(&self) -> PluginError {
        PluginError::Host(unsafe { (self.api.last_error)(self.api.ctx).as_str() }.into_owned())
    }

    pub fn model(&self) -> Result<ModelInfo, PluginError> {
        let json = unsafe { (self.api.model_json)(self.api.ctx).as_str() }.into_owned();
        serde_json::from_str(&json).map_err(|e| PluginError::Host(format!("model facts: {e}")))
    }

    /// Every tensor, sorted by name.
    pub fn tensors(&self) -> Result<Vec<TensorInfo>, PluginError> {
        let count = unsafe { (self.api.tensor_count)(self.api.ctx) };
        (0..count).map(|index| self.tensor_info(index)).collect()
    }

    pub fn tensor_info(&self, index: usize) -> Result<TensorInfo, PluginError> {
        let mut raw = TensorInfoC {
            name: StrRef::empty(),
            role: StrRef::empty(),
            dtype: StrRef::empty(),
            layer: -1,
            shape: std::ptr::null(),
            ndim: 0,
        };
        if unsafe { (self.api.tensor_info)(self.api.ctx, index, &mut raw) } != abi::STATUS_OK {
            return Err(self.last_error());
        }
        let shape = if raw.ndim == 0 || raw.shape.is_null() {
            Vec::new()
        } else {
            unsafe { std::slice::from_raw_parts(raw.shape, raw.ndim) }
                .iter()
                .map(|&d| d as usize)
                .collect()
        };
        Ok(TensorInfo {
            index,
            name: unsafe { raw.name.as_str() }.into_owned(),
            role: unsafe { raw.role.as_str() }.into_owned(),
            dtype: unsafe { raw.dtype.as_str() }.into_owned(),
            layer: usize::try_from(raw.layer).ok(),
            shape,
        })
    }

    /// A tensor's values as f32, lent by the host (borrowed from the mapping
    /// when possible). Dropping the result gives it back.
    pub fn tensor_f32(&self, index: usize) -> Result<F32Tensor<'a>, PluginError> {
        let mut buffer = F32Buffer::empty();
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
        unsafe { (self.api.progress)(self.api.ctx, done, total, StrRef::new(message)) }
    }

    pub fn cancelled(&self) -> bool {
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
    /// follow the work items, like the main table's.
    pub fn emit_table(&self, name: &str, frame: DataFrame) -> Result<(), PluginError> {
        let (mut schema, mut array) = table::export_frame(frame)?;
        let status = unsafe {
            (self.api.emit_table)(self.api.ctx, StrRef::new(name), &mut schema, &mut array)
        };
        if status != abi::STATUS_OK {
            return Err(self.last_error());
        }
        Ok(())
    }

    pub fn info(&self, message: &str) {
        unsafe { (self.api.log)(self.api.ctx, abi::LOG_INFO, StrRef::new(message)) }
    }

    pub fn warn(&self, message: &str) {
        unsafe { (self.api.log)(self.api.ctx, abi::LOG_WARN, StrRef::new(message)) }
    }
}

// The host promises its table is usable from every thread (rayon workers).
unsafe impl Sync for Host<'_> {}
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
        unsafe { std::slice::from_raw_parts(self.buffer.data, self.buffer.len) }
    }
}

impl Drop for F32Tensor<'_> {
    fn drop(&mut self) {
        unsafe { (self.api.release_f32)(self.api.ctx, &mut self.buffer) }
    }
}

unsafe impl Send for F32Tensor<'_> {}
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

    // The raw pointers point into `_strings`, which lives as long as the holder.
    unsafe impl Sync for ApiHolder {}
    unsafe impl Send for ApiHolder {}

    fn c_string(text: &str) -> CString {
        CString::new(text.replace('\0', " ")).expect("NULs were replaced")
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
                abi_version: abi::ABI_VERSION,
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

    thread_local! {
        static PANIC_LOCATION: RefCell<Option<String>> = const { RefCell::new(None) };
    }

    /// Panics inside the plugin are reported as errors by the host, in one
    /// line; the plugin's own std must not print them as well. Each cdylib
    /// has its own std and so its own hook: this touches the plugin only.
    fn quiet_panics() {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            std::panic::set_hook(Box::new(|info| {
                let location = info
                    .location()
                    .map(|l| format!("{}:{}", l.file(), l.line()));
                PANIC_LOCATION.with(|slot| *slot.borrow_mut() = location);
            }))
        });
    }

    fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
        let text = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a non-text panic payload".into());
        match PANIC_LOCATION.with(|slot| slot.borrow_mut().take()) {
            Some(location) => format!("{text} (at {location})"),
            None => text,
        }
    }

    /// Run `body`, turning errors and panics into a status and a message.
    fn guard(host: *const HostApi, body: impl FnOnce() -> Result<(), PluginError>) -> i32 {
        quiet_panics();
        let (status, message) = match catch_unwind(AssertUnwindSafe(body)) {
            Ok(Ok(())) => return abi::STATUS_OK,
            Ok(Err(PluginError::Cancelled)) => (abi::STATUS_CANCELLED, "cancelled".to_string()),
            Ok(Err(error)) => (abi::STATUS_ERROR, error.to_string()),
            Err(payload) => (abi::STATUS_PANIC, panic_message(payload)),
        };
        if let Some(api) = unsafe { host.as_ref() } {
            unsafe { (api.set_error)(api.ctx, StrRef::new(&message)) };
        }
        status
    }

    pub unsafe extern "C" fn work_items_shim<T: Plugin>(
        host: *const HostApi,
        params_json: StrRef,
        out_count: *mut usize,
    ) -> i32 {
        guard(host, || {
            let host = unsafe { Host::from_raw(host) }?;
            let params = Params::from_json(&unsafe { params_json.as_str() })?;
            let count = T::work_items(&host, &params)?;
            if out_count.is_null() {
                return Err("null out_count".into());
            }
            unsafe { out_count.write(count) };
            Ok(())
        })
    }

    pub unsafe extern "C" fn run_shim<T: Plugin>(
        host: *const HostApi,
        params_json: StrRef,
        items: *const usize,
        n_items: usize,
        out_schema: *mut abi::ArrowSchema,
        out_array: *mut abi::ArrowArray,
    ) -> i32 {
        guard(host, || {
            let host = unsafe { Host::from_raw(host) }?;
            let params = Params::from_json(&unsafe { params_json.as_str() })?;
            let items = if n_items == 0 || items.is_null() {
                &[][..]
            } else {
                unsafe { std::slice::from_raw_parts(items, n_items) }
            };
            let frame = T::run(&host, &params, items)?;
            let (schema, array) = table::export_frame(frame)?;
            if out_schema.is_null() || out_array.is_null() {
                return Err("null output pointers".into());
            }
            unsafe {
                out_schema.write(schema);
                out_array.write(array);
            }
            Ok(())
        })
    }

    /// `probe_plugin_api` without letting a panic unwind into the host.
    pub fn api_or_null(make: impl FnOnce() -> *const PluginApi) -> *const PluginApi {
        quiet_panics();
        catch_unwind(AssertUnwindSafe(make)).unwrap_or(std::ptr::null())
    }
}

/// Export a [`Plugin`] implementation as this cdylib's probe plugin.
#[macro_export]
macro_rules! export_plugin {
    ($plugin:ty) => {
        #[no_mangle]
        pub extern "C" fn probe_plugin_abi_version() -> u32 {
            $crate::abi::ABI_VERSION
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
