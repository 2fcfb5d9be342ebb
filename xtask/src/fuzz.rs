//! `cargo xtask fuzz [--seconds N]`: every cargo fuzz target for a bounded
//! time (CI runs it after the tests). The committed corpus is copied, never
//! grown in place; a crash fails the task and leaves its input under
//! `target/fuzz/artifacts/` to be kept in `fuzz/regressions/TARGET/`.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};

/// The version CI installs when `cargo fuzz` is missing.
const CARGO_FUZZ: &str = "0.13.2";

/// Every target in `fuzz/fuzz_targets/`, by file stem.
fn targets(fuzz: &Path) -> Result<Vec<String>> {
    let mut names: Vec<String> = std::fs::read_dir(fuzz.join("fuzz_targets"))?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let path = e.path();
            (path.extension()? == "rs").then(|| path.file_stem()?.to_str().map(String::from))?
        })
        .collect();
    names.sort();
    Ok(names)
}

pub fn run(root: &Path, seconds: u64) -> Result<()> {
    let fuzz = root.join("fuzz");
    let has_cargo_fuzz = Command::new(env!("CARGO"))
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_cargo_fuzz {
        let status = Command::new(env!("CARGO"))
            .args(["install", "--locked", "cargo-fuzz", "--version", CARGO_FUZZ])
            .status()?;
        if !status.success() {
            bail!("cargo install cargo-fuzz {CARGO_FUZZ} failed");
        }
    }
    // No sanitizer: that needs nightly; RUSTC_BOOTSTRAP lets the stable
    // compiler accept the coverage flags cargo fuzz passes.
    let status = Command::new(env!("CARGO"))
        .args(["fuzz", "build", "-s", "none"])
        .env("RUSTC_BOOTSTRAP", "1")
        .current_dir(&fuzz)
        .status()?;
    if !status.success() {
        bail!("cargo fuzz build failed");
    }
    let work = root.join("target/fuzz");
    let artifacts = work.join("artifacts");
    std::fs::create_dir_all(&artifacts)?;
    let bin = fuzz.join("target/x86_64-unknown-linux-gnu/release");
    let mut failed = Vec::new();
    for target in targets(&fuzz)? {
        let corpus = work.join("corpus").join(&target);
        std::fs::create_dir_all(&corpus)?;
        for seeds in [
            fuzz.join("corpus").join(&target),
            fuzz.join("regressions").join(&target),
        ] {
            if let Ok(entries) = std::fs::read_dir(&seeds) {
                for entry in entries.flatten() {
                    std::fs::copy(entry.path(), corpus.join(entry.file_name()))?;
                }
            }
        }
        let output = Command::new(bin.join(&target))
            .arg(&corpus)
            .arg(format!("-max_total_time={seconds}"))
            .arg("-print_final_stats=1")
            .arg(format!(
                "-artifact_prefix={}/{target}-",
                artifacts.display()
            ))
            // Inputs become files the way a user's would; keep them in memory.
            .env(
                "TMPDIR",
                if Path::new("/dev/shm").is_dir() {
                    "/dev/shm"
                } else {
                    "/tmp"
                },
            )
            .output()
            .with_context(|| format!("running the {target} fuzzer"))?;
        let log = String::from_utf8_lossy(&output.stderr);
        let runs = log
            .lines()
            .find_map(|l| l.strip_prefix("stat::number_of_executed_units:"))
            .map_or("?".into(), |n| n.trim().to_string());
        println!(
            "{target}: {runs} executions in {seconds} s ({})",
            output.status
        );
        if !output.status.success() {
            eprintln!(
                "{}",
                log.lines()
                    .rev()
                    .take(30)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect::<Vec<_>>()
                    .join("\n")
            );
            failed.push(target);
        }
    }
    if !failed.is_empty() {
        bail!(
            "fuzzing found crashes in {} (inputs in {})",
            failed.join(", "),
            artifacts.display()
        );
    }
    Ok(())
}
