//! `cargo xtask new-plugin` makes a crate outside the workspace that builds
//! against the SDK and runs in probe.

use std::path::Path;
use std::process::Command;

use crate::util::{fixture, probe, tempdir};

#[test]
fn a_scaffolded_plugin_builds_and_runs() {
    let dir = tempdir();
    let crate_dir = dir.path().join("scaffolded");
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let status = Command::new(env!("CARGO"))
        .current_dir(workspace)
        .args([
            "run",
            "--quiet",
            "--package",
            "xtask",
            "--",
            "new-plugin",
            "scaffolded_check",
            "--path",
        ])
        .arg(&crate_dir)
        .status()
        .unwrap();
    assert!(status.success());
    assert!(crate_dir.join("src/lib.rs").is_file());

    // Build in probe's own target folder: the SDK's dependencies are already
    // compiled there, so this takes seconds, not minutes.
    let target = Path::new(env!("CARGO_BIN_EXE_probe"))
        .parent()
        .unwrap()
        .parent()
        .unwrap();
    let output = Command::new(env!("CARGO"))
        .args(["build", "--quiet", "--manifest-path"])
        .arg(crate_dir.join("Cargo.toml"))
        .env("CARGO_TARGET_DIR", target)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // Move the library out, so probe's own folder does not list it.
    let built = target.join("debug/libprobe_plugin_scaffolded_check.so");
    let lib = dir.path().join("libprobe_plugin_scaffolded_check.so");
    std::fs::rename(&built, &lib).unwrap();

    let out = probe([
        "run",
        "--plugin",
        lib.to_str().unwrap(),
        fixture("llama-tied-f32").to_str().unwrap(),
        "--param",
        "roles=q,k",
        "--format",
        "json",
        "-q",
    ])
    .ok();
    let rows: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(rows.len(), 6, "q and k of 3 layers");
    assert!(rows.iter().all(|r| r["role"] == "q" || r["role"] == "k"));
    assert!(rows.iter().all(|r| r["frobenius"].as_f64().unwrap() > 0.0));

    let info = probe(["plugins", "--plugin-dir", dir.path().to_str().unwrap()]).ok();
    assert!(info.contains("scaffolded_check"));
}
