//! The plugin boundary with real cdylibs: a working plugin, one built for
//! another ABI, one that fails, panics, segfaults or aborts, a shared
//! library that is no plugin, a file that is no library; sharding and merge.

use std::path::Path;

use crate::util::{
    column_f64, column_str, copy_dir, fixture, plugin_lib, probe, read_parquet, run_plugin, tempdir,
};

fn testkit() -> String {
    plugin_lib("probe-testkit").display().to_string()
}

/// `probe run --plugin testkit MODEL --param P… EXTRA…`.
fn testkit_run(model: &Path, params: &[&str], extra: &[&str]) -> crate::util::Run {
    run_plugin(&testkit(), model, params, extra)
}

/// Frobenius norms computed here, independently of the plugin and the host.
fn expected_norms(model: &Path) -> Vec<(String, f64)> {
    let bytes = std::fs::read(model.join("model.safetensors")).unwrap();
    let tensors = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<(String, f64)> = tensors
        .iter()
        .filter(|(_, view)| view.shape().len() == 2)
        .map(|(name, view)| {
            assert_eq!(view.dtype(), safetensors::Dtype::F32);
            let sum: f64 = view
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64)
                .map(|v| v * v)
                .sum();
            (name.to_string(), sum.sqrt())
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

#[test]
fn a_working_plugin_returns_its_table() {
    let model = fixture("llama-tied-f32");
    let dir = tempdir();
    let out = dir.path().join("norms.parquet");
    probe([
        "run",
        "--plugin",
        &testkit(),
        model.to_str().unwrap(),
        "--param",
        "scale=2",
        "--out",
        out.to_str().unwrap(),
        "--quiet",
    ])
    .ok();
    let df = read_parquet(&out);
    let expected = expected_norms(&model);
    assert_eq!(
        column_str(&df, "tensor"),
        expected.iter().map(|e| e.0.clone()).collect::<Vec<_>>()
    );
    for (got, (name, want)) in column_f64(&df, "frobenius").iter().zip(&expected) {
        assert!(
            (got - 2.0 * want).abs() < 1e-9 * want.max(1.0),
            "{name}: {got} vs {}",
            2.0 * want
        );
    }
    let layers = df.column("layer").unwrap().i64().unwrap();
    let tensors = column_str(&df, "tensor");
    let q = tensors
        .iter()
        .position(|t| t == "model.layers.2.self_attn.q_proj.weight")
        .unwrap();
    assert_eq!(layers.get(q), Some(2));
    assert_eq!(column_str(&df, "role")[q], "q");
}

#[test]
fn converted_dtypes_reach_the_plugin_as_f32() {
    // BF16 weights are converted by the host; compare with the same model
    // stored in F32 up to bf16 rounding (~0.4 % per value).
    let run = |name: &str| {
        let out = probe([
            "run",
            "--plugin",
            &testkit(),
            fixture(name).to_str().unwrap(),
            "--format",
            "json",
            "-q",
        ])
        .ok();
        let rows: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
        rows.iter()
            .map(|r| r["frobenius"].as_f64().unwrap())
            .collect::<Vec<_>>()
    };
    let bf16 = run("llama-untied-bf16");
    assert_eq!(bf16.len(), 3 * 7 + 2);
    assert!(bf16.iter().all(|n| n.is_finite() && *n > 0.5));
}

#[test]
fn several_checkpoints_make_one_table_with_a_checkpoint_column() {
    let run = tempdir();
    for step in ["step-20", "step-3"] {
        copy_dir(&fixture("llama-tied-f32"), &run.path().join(step));
    }
    let out = probe([
        "run",
        "--plugin",
        &testkit(),
        run.path().to_str().unwrap(),
        "--format",
        "csv",
        "-q",
    ])
    .ok();
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some("checkpoint,tensor,layer,role,frobenius"));
    let checkpoints: Vec<&str> = lines.map(|l| l.split(',').next().unwrap()).collect();
    assert_eq!(checkpoints.len(), 2 * 22);
    assert!(checkpoints[..22].iter().all(|c| *c == "step-3"));
    assert!(checkpoints[22..].iter().all(|c| *c == "step-20"));
}

#[test]
fn shard_parts_merge_into_the_unsharded_table() {
    let run = tempdir();
    for step in ["a", "b", "c"] {
        copy_dir(&fixture("llama-tied-f32"), &run.path().join(step));
    }
    let dir = tempdir();
    let whole = dir.path().join("whole.parquet");
    let model = run.path().to_str().unwrap();
    probe([
        "run",
        "--plugin",
        &testkit(),
        model,
        "-o",
        whole.to_str().unwrap(),
        "-q",
    ])
    .ok();
    let out = dir.path().join("sweep.parquet");
    let mut parts = Vec::new();
    for index in 0..4 {
        let shard = format!("{index}/4");
        probe([
            "run",
            "--plugin",
            &testkit(),
            model,
            "-o",
            out.to_str().unwrap(),
            "--shard",
            &shard,
            "-q",
        ])
        .ok();
        parts.push(
            dir.path()
                .join(format!("sweep.part-{index:04}-of-0004.parquet")),
        );
    }
    // Parts given out of order are put back in shard order.
    parts.reverse();
    let merged = dir.path().join("merged.parquet");
    let mut args = vec!["merge".to_string()];
    args.extend(parts.iter().map(|p| p.display().to_string()));
    args.extend(["-o".into(), merged.display().to_string()]);
    probe(&args).ok();
    let (whole, merged) = (read_parquet(&whole), read_parquet(&merged));
    assert_eq!(whole.height(), 3 * 22);
    assert!(
        whole.equals_missing(&merged),
        "merged parts differ:\n{whole:?}\n{merged:?}"
    );

    // A missing part is named.
    let missing: Vec<String> = parts[1..].iter().map(|p| p.display().to_string()).collect();
    let mut args = vec!["merge".to_string()];
    args.extend(missing);
    args.extend([
        "-o".into(),
        dir.path().join("x.parquet").display().to_string(),
    ]);
    probe(&args).fails_with(&["part 3 of 4 is missing"]);
}

#[test]
fn shard_from_slurm_environment() {
    let dir = tempdir();
    let out = dir.path().join("s.parquet");
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_probe"))
        .args([
            "run",
            "--plugin",
            &testkit(),
            fixture("bert-f32").to_str().unwrap(),
            "-q",
            "-o",
        ])
        .arg(&out)
        .env("SLURM_ARRAY_TASK_ID", "1")
        .env("SLURM_ARRAY_TASK_COUNT", "2")
        .status()
        .unwrap();
    assert!(status.success());
    let part = read_parquet(&dir.path().join("s.part-0001-of-0002.parquet"));
    // bert-f32: 3 + 3 × 6 + 1 = 22 matrices; shard 1 of 2 is the second half.
    assert_eq!(part.height(), 11);
}

#[test]
fn a_plugin_error_is_one_line() {
    testkit_run(&fixture("llama-tied-f32"), &["mode=error"], &[])
        .fails_with(&["plugin `testkit` failed on llama-tied-f32: asked to fail"]);
}

#[test]
fn a_panicking_plugin_leaves_the_host_alive() {
    testkit_run(&fixture("llama-tied-f32"), &["mode=panic"], &[]).fails_with(&[
        "plugin `testkit` panicked",
        "asked to panic",
        "plugins/testkit/src/lib.rs",
        "on llama-tied-f32",
    ]);
}

#[test]
fn a_segfaulting_plugin_under_isolate_is_reported() {
    let model = fixture("llama-tied-f32");
    testkit_run(&model, &["mode=segfault"], &["--isolate"]).fails_with(&[
        "plugin",
        "crashed with signal 11 (SIGSEGV)",
        "probe itself is unaffected",
    ]);
    testkit_run(&model, &["mode=abort"], &["--isolate"])
        .fails_with(&["crashed with signal 6 (SIGABRT)"]);
    // And isolation changes nothing about a working run.
    let direct = testkit_run(&model, &[], &["-f", "csv", "-q"]).ok();
    let isolated = testkit_run(&model, &[], &["-f", "csv", "-q", "--isolate"]).ok();
    assert_eq!(direct, isolated);
    // An error inside the isolated child is still one line.
    testkit_run(&model, &["mode=error"], &["--isolate"]).fails_with(&["asked to fail"]);
}

#[test]
fn a_plugin_for_another_abi_is_refused() {
    let lib = plugin_lib("probe-testkit-wrong-abi");
    probe([
        "run",
        "--plugin",
        lib.to_str().unwrap(),
        fixture("llama-tied-f32").to_str().unwrap(),
    ])
    .fails_with(&[
        lib.to_str().unwrap(),
        "built for plugin ABI 999.x, but this probe speaks ABI 2.7",
    ]);
}

#[test]
fn a_library_that_is_no_plugin_is_refused() {
    let lib = plugin_lib("probe-testkit-not-a-plugin");
    probe([
        "run",
        "--plugin",
        lib.to_str().unwrap(),
        fixture("llama-tied-f32").to_str().unwrap(),
    ])
    .fails_with(&[lib.to_str().unwrap(), "not a probe plugin"]);
}

#[test]
fn a_file_that_is_no_library_is_refused() {
    let dir = tempdir();
    let fake = dir.path().join("libprobe_plugin_fake.so");
    std::fs::write(&fake, "#!/bin/sh\necho not an ELF file\n").unwrap();
    probe([
        "run",
        "--plugin",
        fake.to_str().unwrap(),
        fixture("llama-tied-f32").to_str().unwrap(),
    ])
    .fails_with(&[fake.to_str().unwrap(), "not a loadable shared library"]);
    probe([
        "run",
        "--plugin",
        "no-such-plugin",
        fixture("llama-tied-f32").to_str().unwrap(),
    ])
    .fails_with(&["no plugin named `no-such-plugin`"]);
}

#[test]
fn bad_parameters_are_refused_before_running() {
    let model = fixture("llama-tied-f32");
    testkit_run(&model, &["colour=red"], &[]).fails_with(&[
        "plugin `testkit`: unknown parameter `colour` (this plugin takes: mode, scale, tokens, blocks, batch)",
    ]);
    testkit_run(&model, &["scale=big"], &[])
        .fails_with(&["parameter `scale`: expected a number, got `big`"]);
    testkit_run(&model, &["mode=dance"], &[])
        .fails_with(&["expected one of ok, forward, run_info, error, panic, segfault, abort"]);
}

#[test]
fn plugins_are_listed_and_described() {
    let dir = tempdir();
    std::fs::copy(
        plugin_lib("probe-testkit"),
        dir.path().join("libprobe_plugin_testkit.so"),
    )
    .unwrap();
    // A broken file in a plugin folder is reported, not fatal.
    std::fs::write(dir.path().join("libprobe_plugin_broken.so"), "junk").unwrap();
    let run = probe(["plugins", "--plugin-dir", dir.path().to_str().unwrap()]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert!(run.stdout.contains("testkit"));
    assert!(run.stdout.contains("misbehaves on request"));
    assert!(run
        .stderr
        .contains("libprobe_plugin_broken.so: not a loadable shared library"));

    let info = probe([
        "plugins",
        "info",
        "testkit",
        "--plugin-dir",
        dir.path().to_str().unwrap(),
    ])
    .ok();
    assert!(info.contains("testkit 0.1.0"));
    assert!(info.contains("mode"));
    assert!(info.contains("ok|forward|run_info|error|panic|segfault|abort"));
    assert!(info.contains("plugin ABI 2.7"), "{info}");
    assert!(info.contains("multiply every norm by this"));

    // By name through PROBE_PLUGIN_PATH, too.
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_probe"))
        .args([
            "run",
            "--plugin",
            "testkit",
            fixture("bert-f32").to_str().unwrap(),
            "-f",
            "json",
            "-q",
        ])
        .env("PROBE_PLUGIN_PATH", dir.path())
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn a_plugin_built_against_an_older_minor_runs() {
    // testkit-bad-table's table says ABI 2.0 (written by hand for it); this
    // host speaks 2.7. It loads, is described with its own version, and runs.
    let dir = tempdir();
    std::fs::copy(
        plugin_lib("probe-testkit-bad-table"),
        dir.path().join("libprobe_plugin_testkit_bad_table.so"),
    )
    .unwrap();
    let info = probe([
        "plugins",
        "info",
        "testkit_bad_table",
        "--plugin-dir",
        dir.path().to_str().unwrap(),
    ])
    .ok();
    assert!(info.contains("plugin ABI 2.0"), "{info}");
    // Its `null` mode succeeds without a table; the host says so in one line
    // rather than failing on the version.
    let lib = dir.path().join("libprobe_plugin_testkit_bad_table.so");
    run_plugin(
        lib.to_str().unwrap(),
        &fixture("llama-tied-f32"),
        &["mode=no_release"],
        &[],
    )
    .fails_with(&["no release callback"]);
}

#[test]
fn the_device_and_threads_reach_the_plugin_and_the_metadata() {
    let model = fixture("llama-tied-f32");
    let dir = tempdir();
    let out = dir.path().join("info.parquet");
    testkit_run(
        &model,
        &["mode=run_info"],
        &[
            "--device",
            "cpu",
            "--threads",
            "1",
            "--out",
            out.to_str().unwrap(),
            "-q",
        ],
    )
    .ok();
    let df = read_parquet(&out);
    assert_eq!(column_str(&df, "device"), ["cpu"]);
    assert_eq!(df.column("threads").unwrap().i64().unwrap().get(0), Some(1));
    assert_eq!(column_str(&df, "host_abi"), ["2.7"]);
    let (_, metadata) = probe::run::read_parquet(&out).unwrap();
    let get = |key: &str| {
        metadata
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    };
    assert_eq!(get("probe.device"), Some("cpu"));
    assert_eq!(get("probe.threads"), Some("1"));
}

#[test]
fn cuda_without_the_gpu_build_fails_before_any_work() {
    // The ONNX Runtime this project installs is the CPU build: asking for
    // CUDA is an error with ONNX Runtime's reason, never a silent CPU run —
    // even for a plugin that would make no forward pass.
    let model = fixture("llama-tied-f32");
    for plugin in [
        plugin_lib("probe-plugin-vshape"),
        plugin_lib("probe-testkit"),
    ] {
        run_plugin(
            plugin.to_str().unwrap(),
            &model,
            &[],
            &["--device", "cuda", "-q"],
        )
        .fails_with(&["the cuda execution provider cannot be used"]);
    }
}

#[test]
fn a_selection_that_matches_nothing_names_the_parameter() {
    // Tried as a new user would: an unknown role, a role the model lacks,
    // a block it does not have. Each is an error before the plugin runs.
    let spectral = plugin_lib("probe-plugin-spectral");
    let spectral = spectral.to_str().unwrap();
    let model = fixture("llama-tied-f32");
    run_plugin(spectral, &model, &["roles=nope"], &[]).fails_with(&[
        "parameter `roles`: expected roles among embed,",
        "got `nope`",
    ]);
    run_plugin(spectral, &model, &["roles=attn_norm"], &[]).fails_with(&[
        "parameter `roles`: expected roles among embed, pos_embed, type_embed, lm_head, q,",
        "got `attn_norm`",
    ]);
    run_plugin(spectral, &model, &["roles=qkv"], &[]).fails_with(&[
        "parameter `roles` selects what llama-tied-f32 lacks: the model has no qkv tensors (it has: embed, q, k, v, o, gate, up, down)",
    ]);
    run_plugin(spectral, &model, &["layers=99"], &[]).fails_with(&[
        "parameter `layers` selects what llama-tied-f32 lacks: the model has blocks 0-2; 99 is not among them",
    ]);
    // A selection that fits runs.
    let dir = tempdir();
    let out = dir.path().join("s.parquet");
    run_plugin(
        spectral,
        &model,
        &["roles=q,k", "layers=1"],
        &["--out", out.to_str().unwrap(), "-q"],
    )
    .ok();
    let df = read_parquet(&out);
    assert_eq!(column_str(&df, "role"), ["k", "q"]);
}
