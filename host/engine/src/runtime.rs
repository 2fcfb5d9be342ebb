//! Finding and loading the ONNX Runtime library.
//!
//! ort is built with `load-dynamic`: nothing links against ONNX Runtime at
//! build time, the shared library is opened on first use. It comes from the
//! PyPI wheel that `cargo xtask ort` unpacks into `.ort/`; `ORT_DYLIB_PATH`
//! overrides the search. A missing or unusable library is an error that names
//! the places looked at and the command that installs it, never a panic.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::ForwardError;

/// The library file inside the wheel, relative to the folder `cargo xtask ort` fills.
pub const LIBRARY_IN_WHEEL: &str = "onnxruntime/capi/libonnxruntime.so.1.32.0";
/// The folder, relative to the project root, that `cargo xtask ort` fills.
pub const DEFAULT_DIR: &str = ".ort";

/// Where the library is looked for, in order.
pub fn candidates() -> Vec<PathBuf> {
    let mut found = Vec::new();
    if let Some(path) = std::env::var_os("ORT_DYLIB_PATH").filter(|p| !p.is_empty()) {
        found.push(PathBuf::from(path));
        // An explicit path is the only candidate: silently using another
        // library than the one the user named would hide their mistake.
        return found;
    }
    // The project checkout the binary was built in (target/<profile>/probe →
    // the folder holding .ort), then any ancestor of the executable.
    if let Ok(exe) = std::env::current_exe() {
        for dir in exe.ancestors().skip(1) {
            found.push(dir.join(DEFAULT_DIR).join(LIBRARY_IN_WHEEL));
        }
    }
    // This crate sits at host/engine/ in the checkout.
    let built_in = Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .map(|root| root.join(DEFAULT_DIR).join(LIBRARY_IN_WHEEL));
    found.extend(built_in);
    if let Some(data) = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
    {
        found.push(data.join("probe").join(DEFAULT_DIR).join(LIBRARY_IN_WHEEL));
    }
    let mut unique = Vec::new();
    for path in found {
        if !unique.contains(&path) {
            unique.push(path);
        }
    }
    unique
}

/// Load ONNX Runtime once per process and return its environment.
pub fn environment() -> Result<&'static ort::environment::Environment, ForwardError> {
    static ENVIRONMENT: OnceLock<Result<ort::environment::Environment, String>> = OnceLock::new();
    ENVIRONMENT
        .get_or_init(|| {
            let candidates = candidates();
            let Some(path) = candidates.iter().find(|p| p.is_file()) else {
                let looked = candidates
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ");
                return Err(format!(
                    "ONNX Runtime library not found (looked for {looked}); install it with `cargo xtask ort` or set ORT_DYLIB_PATH to libonnxruntime.so"
                ));
            };
            let builder = ort::init_from(path)
                .map_err(|e| format!("{}: cannot load ONNX Runtime: {e}", path.display()))?;
            builder
                .with_name("probe")
                .with_telemetry(false)
                .build()
                .map_err(|e| format!("{}: cannot start ONNX Runtime: {e}", path.display()))
        })
        .as_ref()
        .map_err(|message| ForwardError::Runtime(message.clone()))
}
