//! `cargo xtask new-plugin NAME --path DIR`: a plugin crate outside the
//! workspace, depending on the SDK, that builds a cdylib probe can load.

use std::path::Path;

use anyhow::{bail, Context, Result};

const LIB_TEMPLATE: &str = include_str!("../templates/plugin_lib.rs");
const MANIFEST_TEMPLATE: &str = include_str!("../templates/plugin_Cargo.toml");

pub fn new_plugin(root: &Path, name: &str, dir: &Path) -> Result<()> {
    let valid = !name.is_empty()
        && name.chars().next().is_some_and(|c| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if !valid {
        bail!(
            "plugin name `{name}` must be lowercase letters, digits and _ (starting with a letter)"
        );
    }
    if dir.exists() && std::fs::read_dir(dir)?.next().is_some() {
        bail!("{} exists and is not empty", dir.display());
    }
    let sdk = root
        .join("plugins/sdk")
        .canonicalize()
        .context("finding plugins/sdk")?;
    let type_name: String = name
        .split('_')
        .map(|part| {
            let mut chars = part.chars();
            chars
                .next()
                .map(|c| c.to_ascii_uppercase().to_string() + chars.as_str())
                .unwrap_or_default()
        })
        .collect();
    let fill = |template: &str| {
        template
            .replace("{{name}}", name)
            .replace("{{type_name}}", &type_name)
            .replace("{{sdk_path}}", &sdk.display().to_string())
    };
    std::fs::create_dir_all(dir.join("src"))?;
    std::fs::write(dir.join("Cargo.toml"), fill(MANIFEST_TEMPLATE))?;
    std::fs::write(dir.join("src/lib.rs"), fill(LIB_TEMPLATE))?;
    // The same dependency versions probe was built and tested with.
    if root.join("Cargo.lock").is_file() {
        std::fs::copy(root.join("Cargo.lock"), dir.join("Cargo.lock"))?;
    }
    // With probe's build folder reused (seconds, not minutes), the library
    // lands there, not in the plugin's own folder.
    let target = root.join("target");
    println!(
        "created {dir}\n\nnext (reusing probe's build folder, so polars is not compiled again):\n  CARGO_TARGET_DIR={target} cargo build --manifest-path {dir}/Cargo.toml\n  probe run --plugin {target}/debug/libprobe_plugin_{name}.so MODEL",
        dir = dir.display(),
        target = target.display()
    );
    Ok(())
}
