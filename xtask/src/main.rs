//! `cargo xtask …`: project chores that are code, not shell scripts.
//!
//! - `fixtures [--check]`: regenerate the committed test checkpoints (or check they are current).
//! - `models`: fetch and convert the real models, pinned by sha256, into `.models/`.
//! - `ort`: fetch the ONNX Runtime shared library (PyPI wheel, pinned by sha256) into `.ort/`.
//! - `new-plugin NAME --path DIR`: scaffold a plugin crate outside the workspace.
//! - `plugins [--release]`: build probe and the built-in plugins into `target/<profile>/plugins/`.
//! - `bench forward`: forward-pass tokens/s on SmolLM2 against llama.cpp.
//! - `bench contrastive`: the contrastive plugin on SmolLM2 against a numpy f64 reference.
//! - `bench studies`: lens, knockout and swap on SmolLM2 against a numpy f64 reference.
//! - `bench quant`: the quant plugin on SmolLM2 (the default run, and 3 bits against a numpy f64 reference).
//! - `bench residual`: geometry, autopsy and linearity on SmolLM2 against a numpy f64 reference.
//! - `bench patch`: the patch plugin on SmolLM2 against a numpy f64 reference.
//! - `fuzz [--seconds N]`: every cargo fuzz target for a bounded time.
//! - `bench shuffle [--gemma]`: every shuffle method on a shuffled SmolLM2 (or
//!   the published and default pipelines on Gemma 3 270M) against the
//!   published pipeline (loss bubble seeded by flow), the default on N seeds.
//! - `bench inspect`: time `probe inspect` on a 1 GB checkpoint and record it in BENCHMARKS.md.

mod bench;
mod fuzz;
mod models;
mod scaffold;

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use bench::ShuffleSubject::{Gemma3, SmolLm2};

fn main() {
    if let Err(error) = run() {
        eprintln!("xtask: error: {error:#}");
        std::process::exit(2);
    }
}

fn run() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match args.as_slice() {
        ["fixtures"] => fixtures(false),
        ["fixtures", "--check"] => fixtures(true),
        ["models"] => models::fetch_all(&workspace_root()),
        ["ort"] => models::fetch_ort(&workspace_root()),
        ["ort", "--gpu"] => models::fetch_ort_gpu(&workspace_root()),
        ["fuzz"] => fuzz::run(&workspace_root(), 30),
        ["fuzz", "--seconds", n] => fuzz::run(&workspace_root(), n.parse()?),
        ["bench", "inspect"] => bench::inspect(&workspace_root()),
        ["bench", "spectral"] => bench::spectral(&workspace_root()),
        ["bench", "forward"] => bench::forward(&workspace_root()),
        ["bench", "contrastive"] => bench::contrastive(&workspace_root()),
        ["bench", "studies"] => bench::studies(&workspace_root()),
        ["bench", "quant"] => bench::quant(&workspace_root()),
        ["bench", "residual"] => bench::residual(&workspace_root()),
        ["bench", "patch"] => bench::patch(&workspace_root()),
        ["bench", "shuffle"] => bench::shuffle(&workspace_root(), SmolLm2, 20),
        ["bench", "shuffle", "--seeds", n] => {
            bench::shuffle(&workspace_root(), SmolLm2, n.parse()?)
        }
        ["bench", "shuffle", "--gemma"] => bench::shuffle(&workspace_root(), Gemma3, 20),
        ["bench", "shuffle", "--gemma", "--seeds", n] => {
            bench::shuffle(&workspace_root(), Gemma3, n.parse()?)
        }
        ["new-plugin", name, "--path", dir] => scaffold::new_plugin(&workspace_root(), name, Path::new(dir)),
        ["plugins"] => plugins(&workspace_root(), false),
        ["plugins", "--release"] => plugins(&workspace_root(), true),
        _ => bail!(
            "usage: cargo xtask <command>\n  fixtures [--check]   regenerate (or check) fixtures/data\n  models               fetch and convert the real models into .models/\n  ort                  fetch the ONNX Runtime library into .ort/\n  ort --gpu            fetch its CUDA 12 build and NVIDIA's runtime libraries into .ort-gpu/\n  fuzz [--seconds N]   every cargo fuzz target for N s (default 30)\n  bench inspect        time `probe inspect` on a 1 GB checkpoint\n  bench spectral       time the spectral plugin on SmolLM2 against numpy\n  bench forward        time forward passes on SmolLM2 against llama.cpp\n  bench contrastive    the contrastive plugin on SmolLM2 against a numpy reference\n  bench studies        lens, knockout and swap on SmolLM2 against a numpy reference\n  bench quant          the quant plugin on SmolLM2 (3 bits against a numpy reference)\n  bench residual       geometry, autopsy and linearity on SmolLM2 against a numpy reference\n  bench patch          the patch plugin on SmolLM2 against a numpy reference\n  bench shuffle [--seeds N]  every shuffle method on SmolLM2, the default on N seeds\n  bench shuffle --gemma [--seeds N]  the published and default pipelines on Gemma 3 270M, the default on N seeds in both config forms\n  new-plugin NAME --path DIR   scaffold a plugin crate outside the workspace\n  plugins [--release]  build probe and the built-in plugins, put them where probe finds them"
        ),
    }
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives inside the workspace")
        .to_path_buf()
}

fn fixtures(check: bool) -> Result<()> {
    let committed = probe_fixtures::data_dir();
    if !check {
        if committed.exists() {
            std::fs::remove_dir_all(&committed)?;
        }
        let written = probe_fixtures::write_all(&committed)?;
        println!(
            "wrote {} fixtures to {}",
            written.len(),
            committed.display()
        );
        return Ok(());
    }
    let fresh = std::env::temp_dir().join(format!("probe-fixtures-{}", std::process::id()));
    probe_fixtures::write_all(&fresh)?;
    let stale = diff_trees(&fresh, &committed)?;
    std::fs::remove_dir_all(&fresh)?;
    if !stale.is_empty() {
        bail!(
            "fixtures/data is out of date ({}); run `cargo xtask fixtures`",
            stale.join(", ")
        );
    }
    println!("fixtures/data is current");
    Ok(())
}

/// Relative paths whose bytes differ between two trees (or exist in one only).
fn diff_trees(a: &Path, b: &Path) -> Result<Vec<String>> {
    fn files(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            if path.is_dir() {
                files(root, &path, out)?;
            } else {
                out.push(path.strip_prefix(root).expect("below root").to_path_buf());
            }
        }
        Ok(())
    }
    let (mut left, mut right) = (Vec::new(), Vec::new());
    files(a, a, &mut left)?;
    if b.exists() {
        files(b, b, &mut right)?;
    }
    left.sort();
    right.sort();
    let mut differing = Vec::new();
    for path in left
        .iter()
        .chain(right.iter().filter(|p| !left.contains(p)))
    {
        let x = std::fs::read(a.join(path)).ok();
        let y = std::fs::read(b.join(path)).ok();
        if x.is_none() || x != y {
            differing.push(path.display().to_string());
        }
    }
    Ok(differing)
}

/// The built-in plugins: every `probe-plugin-*` crate of the workspace.
pub const BUILTIN_PLUGINS: &[&str] = &[
    "probe-plugin-spectral",
    "probe-plugin-vshape",
    "probe-plugin-shuffle",
    "probe-plugin-contrastive",
    "probe-plugin-lens",
    "probe-plugin-knockout",
    "probe-plugin-swap",
    "probe-plugin-quant",
    "probe-plugin-geometry",
    "probe-plugin-autopsy",
    "probe-plugin-linearity",
    "probe-plugin-patch",
];

/// Build probe and the built-in plugins, and copy the plugins into
/// `target/<profile>/plugins/`, the folder beside the executable probe searches.
fn plugins(root: &Path, release: bool) -> Result<()> {
    let mut cargo = std::process::Command::new(env!("CARGO"));
    cargo
        .current_dir(root)
        .args(["build", "--package", "probe"]);
    if release {
        cargo.arg("--release");
    }
    for name in BUILTIN_PLUGINS {
        cargo.args(["--package", name]);
    }
    if !cargo.status()?.success() {
        bail!("cargo build failed");
    }
    let profile_dir = root
        .join("target")
        .join(if release { "release" } else { "debug" });
    let dest = profile_dir.join("plugins");
    std::fs::create_dir_all(&dest)?;
    for name in BUILTIN_PLUGINS {
        let file = format!("lib{}.so", name.replace('-', "_"));
        std::fs::copy(profile_dir.join(&file), dest.join(&file))?;
        println!("{}", dest.join(&file).display());
    }
    Ok(())
}
