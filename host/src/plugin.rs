//! Finding and loading plugins (cdylibs, through libloading), and calling
//! them through the ABI of `probe-sdk`.
//!
//! Loaded libraries are cached for the life of the process and never
//! unloaded: a plugin may leave threads (rayon's pool) or thread-locals
//! behind, and unloading code they still point into would crash later.

use std::collections::HashMap;
use std::ffi::{c_char, CStr};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use probe_contract::abi::{self, AbiVersion, PluginApi};
use probe_contract::ParamSpec;

#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error(
        "no plugin named `{name}` (looked in: {searched}); `probe plugins` lists the plugins found"
    )]
    NotFound { name: String, searched: String },
    #[error("{}: no such plugin file", path.display())]
    NoFile { path: PathBuf },
    #[error("{}: not a loadable shared library ({reason})", path.display())]
    NotALibrary { path: PathBuf, reason: String },
    #[error("{}: a shared library, but not a probe plugin (it has no `probe_plugin_abi_version` symbol)", path.display())]
    NotAPlugin { path: PathBuf },
    #[error("{}: built for plugin ABI {found}.x, but this probe speaks ABI {expected}; rebuild the plugin against probe-sdk {}", path.display(), env!("CARGO_PKG_VERSION"))]
    WrongAbi {
        path: PathBuf,
        found: u32,
        expected: AbiVersion,
    },
    #[error("{}: {problem}", path.display())]
    BadTable { path: PathBuf, problem: String },
}

/// A plugin library, loaded and checked.
pub struct LoadedPlugin {
    pub path: PathBuf,
    pub name: String,
    pub version: String,
    pub summary: String,
    pub description: String,
    pub params: Vec<ParamSpec>,
    /// The plugin ABI version it was built against.
    pub abi: AbiVersion,
    pub(crate) api: &'static PluginApi,
}

impl std::fmt::Debug for LoadedPlugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedPlugin")
            .field("path", &self.path)
            .field("name", &self.name)
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

fn cache() -> &'static Mutex<HashMap<PathBuf, &'static LoadedPlugin>> {
    static CACHE: OnceLock<Mutex<HashMap<PathBuf, &'static LoadedPlugin>>> = OnceLock::new();
    CACHE.get_or_init(Default::default)
}

/// Load (once) the plugin at `path`.
pub fn load(path: &Path) -> Result<&'static LoadedPlugin, PluginError> {
    if !path.is_file() {
        return Err(PluginError::NoFile {
            path: path.to_path_buf(),
        });
    }
    let key = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    let mut cache = cache().lock().unwrap_or_else(|p| p.into_inner());
    if let Some(plugin) = cache.get(&key) {
        return Ok(plugin);
    }
    let plugin: &'static LoadedPlugin = Box::leak(Box::new(load_uncached(path)?));
    cache.insert(key, plugin);
    Ok(plugin)
}

fn load_uncached(path: &Path) -> Result<LoadedPlugin, PluginError> {
    // SAFETY: loading a library runs its initialisers. Plugins are trusted
    // code by design (see SECURITY.md); `--isolate` runs them in a child.
    let library =
        unsafe { libloading::Library::new(path) }.map_err(|e| PluginError::NotALibrary {
            path: path.to_path_buf(),
            reason: short_reason(&e.to_string(), path),
        })?;
    // Never unloaded: see the module comment.
    let library: &'static libloading::Library = Box::leak(Box::new(library));

    // 1. The ABI major version, before anything else is touched.
    // SAFETY: the symbol's type is the one every probe plugin exports.
    let version_fn =
        unsafe { library.get::<unsafe extern "C" fn() -> u32>(abi::ABI_VERSION_SYMBOL) }.map_err(
            |_| PluginError::NotAPlugin {
                path: path.to_path_buf(),
            },
        )?;
    // SAFETY: a plugin's version function takes nothing and returns a number.
    let found = unsafe { version_fn() };
    if found != abi::ABI_MAJOR {
        return Err(PluginError::WrongAbi {
            path: path.to_path_buf(),
            found,
            expected: abi::ABI_VERSION,
        });
    }
    // 2. The plugin's table.
    let bad = |problem: &str| PluginError::BadTable {
        path: path.to_path_buf(),
        problem: problem.to_string(),
    };
    // SAFETY: the symbol's type is the one every probe plugin of this major exports.
    let api_fn = unsafe {
        library.get::<unsafe extern "C" fn() -> *const PluginApi>(abi::PLUGIN_API_SYMBOL)
    }
    .map_err(|_| bad("exports an ABI version but no `probe_plugin_api` table"))?;
    // SAFETY: the plugin returns null or its static table, which lives as
    // long as the library (never unloaded).
    let api: &'static PluginApi = unsafe { api_fn().as_ref() }
        .ok_or_else(|| bad("its plugin table is null (did it panic while starting?)"))?;
    // Every minor of this major has at least the 2.0 table: a newer minor may
    // append fields this host does not read.
    if api.size < std::mem::size_of::<PluginApi>() || api.abi.major != abi::ABI_MAJOR {
        return Err(bad(&format!(
            "its plugin table ({} bytes, ABI {}) is not an ABI {}.x table",
            api.size,
            api.abi,
            abi::ABI_MAJOR
        )));
    }
    let text = |ptr: *const c_char, what: &str| -> Result<String, PluginError> {
        if ptr.is_null() {
            return Err(bad(&format!("its {what} is missing")));
        }
        // SAFETY: non-null static NUL-terminated strings of the plugin's table.
        Ok(unsafe { CStr::from_ptr(ptr) }
            .to_string_lossy()
            .into_owned())
    };
    let name = text(api.name, "name")?;
    if name.is_empty() {
        return Err(bad("its name is empty"));
    }
    let params_json = text(api.params_json, "parameter list")?;
    let params: Vec<ParamSpec> = serde_json::from_str(&params_json)
        .map_err(|e| bad(&format!("its parameter list is not valid: {e}")))?;
    Ok(LoadedPlugin {
        path: path.to_path_buf(),
        version: text(api.version, "version")?,
        summary: text(api.summary, "summary")?,
        description: text(api.description, "description")?,
        name,
        params,
        abi: api.abi,
        api,
    })
}

/// dlopen's message repeats the path; keep the part after it.
fn short_reason(message: &str, path: &Path) -> String {
    let path_text = path.display().to_string();
    message
        .rsplit_once(&format!("{path_text}: "))
        .map(|(_, rest)| rest.to_string())
        .unwrap_or_else(|| message.to_string())
}

/// Where plugins are looked for, in order: `--plugin-dir`, `PROBE_PLUGIN_PATH`,
/// `plugins/` beside the executable, the executable's own folder (where
/// cargo puts the built-in plugins), and the user's data folder.
pub fn search_dirs(plugin_dirs: &[PathBuf]) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = plugin_dirs.to_vec();
    if let Some(path) = std::env::var_os("PROBE_PLUGIN_PATH") {
        dirs.extend(std::env::split_paths(&path).filter(|p| !p.as_os_str().is_empty()));
    }
    if let Some(exe_dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf))
    {
        dirs.push(exe_dir.join("plugins"));
        dirs.push(exe_dir);
    }
    if let Some(data) = data_dir() {
        dirs.push(data.join("probe").join("plugins"));
    }
    dirs
}

fn data_dir() -> Option<PathBuf> {
    std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".local/share")))
}

const PREFIX: &str = "libprobe_plugin_";
const SUFFIX: &str = std::env::consts::DLL_SUFFIX;

/// The file a plugin name refers to: a path, or a name looked up in the dirs.
pub fn find(name: &str, dirs: &[PathBuf]) -> Result<PathBuf, PluginError> {
    if name.contains('/') || name.ends_with(SUFFIX) {
        return Ok(PathBuf::from(name));
    }
    let stem = name.replace('-', "_");
    let candidates = [
        format!("{PREFIX}{stem}{SUFFIX}"),
        format!("lib{stem}{SUFFIX}"),
        format!("{stem}{SUFFIX}"),
    ];
    for dir in dirs {
        for candidate in &candidates {
            let path = dir.join(candidate);
            if path.is_file() {
                return Ok(path);
            }
        }
    }
    Err(PluginError::NotFound {
        name: name.to_string(),
        searched: dirs
            .iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
    })
}

/// Every plugin in the search dirs (first found wins per name), with the
/// files that looked like plugins but failed to load.
pub fn discover(dirs: &[PathBuf]) -> (Vec<&'static LoadedPlugin>, Vec<PluginError>) {
    let mut found: Vec<&'static LoadedPlugin> = Vec::new();
    let mut failures = Vec::new();
    for dir in dirs {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        let mut files: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(PREFIX) && n.ends_with(SUFFIX))
            })
            .collect();
        files.sort();
        for file in files {
            match load(&file) {
                Ok(plugin) if !found.iter().any(|p| p.name == plugin.name) => found.push(plugin),
                Ok(_) => {}
                Err(error) => failures.push(error),
            }
        }
    }
    found.sort_by(|a, b| a.name.cmp(&b.name));
    (found, failures)
}
