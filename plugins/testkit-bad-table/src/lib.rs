//! Speaks the plugin ABI by hand (no `export_plugin!`) so that its `run` can
//! hand the host broken Arrow tables: each `mode` breaks one rule of the C
//! Data Interface. The host must refuse every one with a message.
//!
//! Written by hand against plugin ABI 2.0 (its table says so): the tests
//! also use it as the plugin built against an older minor than the host's.

use std::ffi::CStr;

use polars_arrow::ffi::{ArrowArray, ArrowSchema};
use probe_sdk::abi::{self, AbiVersion, HostApi, PluginApi, StrRef};
use probe_sdk::polars::prelude::*;
use probe_sdk::validate::{RawArray, RawSchema};

const MODES: &str = "null, no_release, not_struct, child_count, missing_buffer, null_data, bad_length, short_child, bad_format";

#[no_mangle]
pub extern "C" fn probe_plugin_abi_version() -> u32 {
    abi::ABI_MAJOR
}

struct Api(PluginApi);
// SAFETY: the table points to static strings and functions only.
unsafe impl Sync for Api {}

static PARAMS: &CStr =
    c"[{\"name\":\"mode\",\"kind\":\"str\",\"default\":\"null\",\"help\":\"which rule to break\"}]";

static API: Api = Api(PluginApi {
    size: std::mem::size_of::<PluginApi>(),
    abi: AbiVersion {
        major: abi::ABI_MAJOR,
        minor: 0,
    },
    name: c"testkit-bad-table".as_ptr(),
    version: c"0.1.0".as_ptr(),
    summary: c"returns broken Arrow tables (for tests)".as_ptr(),
    description: c"Each mode breaks one rule of the Arrow C Data Interface.".as_ptr(),
    params_json: PARAMS.as_ptr(),
    work_items,
    run,
});

#[no_mangle]
pub extern "C" fn probe_plugin_api() -> *const PluginApi {
    &API.0
}

unsafe extern "C" fn work_items(_host: *const HostApi, _params: StrRef, out: *mut usize) -> i32 {
    if !out.is_null() {
        // SAFETY: non-null place for one count, as the ABI passes.
        unsafe { out.write(1) };
    }
    abi::STATUS_OK
}

fn good_table() -> (ArrowSchema, ArrowArray) {
    let frame = df!("a" => [1i64, 2, 3], "b" => [0.5f64, 1.5, 2.5]).expect("a small frame");
    probe_sdk::table::export_frame(frame).expect("exportable")
}

unsafe extern "C" fn run(
    host: *const HostApi,
    params_json: StrRef,
    _items: *const usize,
    _n_items: usize,
    out_schema: *mut abi::ArrowSchema,
    out_array: *mut abi::ArrowArray,
) -> i32 {
    let out_schema = probe_sdk::table::c_schema_out(out_schema);
    let out_array = probe_sdk::table::c_array_out(out_array);
    // SAFETY: the host lends the parameters for the call.
    let params = unsafe { params_json.as_str() };
    let mode = params
        .split("\"mode\":\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap_or("null")
        .to_string();
    if mode == "null" {
        // Success, but nothing written: both structs stay released.
        return abi::STATUS_OK;
    }
    let (schema, array) = if mode == "not_struct" {
        let column = Series::new("x".into(), [1i64, 2, 3]);
        let field = column.field().to_arrow(CompatLevel::newest());
        (
            polars_arrow::ffi::export_field_to_c(&field),
            polars_arrow::ffi::export_array_to_c(column.to_arrow(0, CompatLevel::newest())),
        )
    } else {
        good_table()
    };
    // SAFETY: the host passes places for one schema and one array; the raw
    // views have the interface's layout (checked in probe_sdk::validate), and
    // breaking them is this plugin's purpose.
    unsafe {
        out_schema.write(schema);
        out_array.write(array);
        let raw_schema = &mut *(out_schema as *mut RawSchema);
        let raw = &mut *(out_array as *mut RawArray);
        match mode.as_str() {
            "no_release" => raw.release = None,
            "not_struct" => {}
            "child_count" => raw.n_children = 1,
            "missing_buffer" => (**raw.children).n_buffers = 0,
            "null_data" => *(**raw.children).buffers.add(1) = std::ptr::null(),
            "bad_length" => raw.length = -5,
            "short_child" => (**raw.children).length = 1,
            "bad_format" => (**raw_schema.children).format = c"q!".as_ptr(),
            other => {
                let message = format!("unknown mode `{other}` (modes: {MODES})");
                if let Some(host) = host.as_ref() {
                    (host.set_error)(host.ctx, StrRef::new(&message));
                }
                return abi::STATUS_ERROR;
            }
        }
    }
    abi::STATUS_OK
}
