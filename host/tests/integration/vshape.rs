//! The vshape plugin (a real cdylib) on a parameter-golf checkpoint built
//! here with hand-picked values, so every number of its table is computed by
//! hand below; and on SmolLM2 with both profiles.

use std::collections::BTreeMap;
use std::path::Path;

use crate::real_models::real_model;
use crate::util::{column_f64, column_i64, fixture, read_parquet, run_plugin_to, tempdir};

/// Write F32 tensors as one safetensors file.
fn write_checkpoint(path: &Path, tensors: &BTreeMap<String, (Vec<usize>, Vec<f32>)>) {
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(name, (shape, values))| {
            (
                name.clone(),
                shape.clone(),
                values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            )
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = bytes
        .iter()
        .map(|(name, shape, data)| {
            (
                name.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), data)
                    .unwrap(),
            )
        })
        .collect();
    std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
}

/// `scale · I` padded with zero columns to `cols`.
fn scaled_identity(rows: usize, cols: usize, scale: f32) -> Vec<f32> {
    (0..rows * cols)
        .map(|i| if i / cols == i % cols { scale } else { 0.0 })
        .collect()
}

#[test]
fn parameter_golf_contributions_match_the_hand_computed_table() {
    // d = 4, MLP width 8, 2 heads of 2, KV width 2, 3 blocks, tied.
    let a = [1.0f32, 2.0, 0.5]; // attn.proj = a·I₄ → ‖W_O‖_F = 2a
    let b = [3.0f32, 1.0, 2.0]; // mlp.proj = [b·I₄ | 0] → ‖W_down‖_F = 2b
    let s = [0.5f32, 1.0, 0.25]; // attn_scale
    let m = [1.0f32, 0.5, 2.0]; // mlp_scale
    let mix = [0.1f32, 0.2, 0.3]; // resid_mix row 1 (the x0 weight)
    let mut t = BTreeMap::new();
    let mut put = |name: String, shape: Vec<usize>, values: Vec<f32>| {
        t.insert(name, (shape, values));
    };
    put(
        "tok_emb.weight".into(),
        vec![16, 4],
        (0..64).map(|i| i as f32 / 64.0).collect(),
    );
    put("skip_weights".into(), vec![1, 4], vec![0.8; 4]);
    put("skip_gates".into(), vec![1, 4], vec![0.0; 4]); // σ(0) = ½
    for i in 0..3 {
        let l = format!("blocks.{i}");
        put(format!("{l}.attn.c_q.weight"), vec![4, 4], vec![0.1; 16]);
        put(format!("{l}.attn.c_k.weight"), vec![2, 4], vec![0.1; 8]);
        put(format!("{l}.attn.c_v.weight"), vec![2, 4], vec![0.1; 8]);
        put(
            format!("{l}.attn.proj.weight"),
            vec![4, 4],
            scaled_identity(4, 4, a[i]),
        );
        put(format!("{l}.mlp.fc.weight"), vec![8, 4], vec![0.1; 32]);
        put(
            format!("{l}.mlp.proj.weight"),
            vec![4, 8],
            scaled_identity(4, 8, b[i]),
        );
        put(format!("{l}.attn_scale"), vec![4], vec![s[i]; 4]);
        put(format!("{l}.mlp_scale"), vec![4], vec![m[i]; 4]);
        let mut resid = vec![1.0; 4];
        resid.extend([mix[i]; 4]);
        put(format!("{l}.resid_mix"), vec![2, 4], resid);
        put(format!("{l}.attn.q_gain"), vec![2], vec![1.0, 3.0]); // mean 2, std 1
    }
    let dir = tempdir();
    let model = dir.path().join("golf.safetensors");
    write_checkpoint(&model, &t);
    let out = dir.path().join("vshape.parquet");
    run_plugin_to("probe-plugin-vshape", &model, &[], &out);
    let table = read_parquet(&out);

    let eff_attn = [0.5 * 2.0, 1.0 * 4.0, 0.25 * 1.0];
    let eff_mlp = [1.0 * 6.0, 0.5 * 2.0, 2.0 * 4.0];
    let totals = [7.0, 5.0, 8.25];
    let sum = 20.25;
    let f64s = |name: &str| column_f64(&table, name);
    assert_eq!(column_i64(&table, "layer"), vec![0, 1, 2]);
    assert_eq!(f64s("eff_attn"), eff_attn);
    assert_eq!(f64s("eff_mlp"), eff_mlp);
    assert_eq!(f64s("eff_total"), totals);
    assert_eq!(f64s("share"), totals.map(|t| t / sum));
    // Every block holds 16+8+8+16+32+32 matrix + 4+4+8+2 vector values.
    assert_eq!(f64s("param_share"), vec![1.0 / 3.0; 3]);
    let x0 = f64s("x0_mix");
    for (got, want) in x0.iter().zip(mix) {
        assert!((got - want as f64).abs() < 1e-7);
    }
    assert_eq!(f64s("q_gain_mean"), vec![2.0; 3]);
    assert_eq!(f64s("q_gain_std"), vec![1.0; 3]);

    let summary = read_parquet(&dir.path().join("vshape.summary.parquet"));
    let one = |name: &str| summary.column(name).unwrap().get(0).unwrap();
    assert_eq!(one("tied_embeddings").to_string(), "true");
    assert_eq!(one("min_max_ratio").extract::<f64>().unwrap(), 5.0 / 8.25);
    assert_eq!(one("peak_block").extract::<i64>().unwrap(), 2);
    assert_eq!(
        one("boundary_share").extract::<f64>().unwrap(),
        (7.0 + 8.25) / sum
    );
    assert_eq!(
        one("boundary_param_share").extract::<f64>().unwrap(),
        2.0 / 3.0
    );
    assert!((one("skip_effective_weight").extract::<f64>().unwrap() - 0.4).abs() < 1e-7);
    assert!((one("x0_mix_mean").extract::<f64>().unwrap() - 0.2).abs() < 1e-7);
}

#[test]
fn gemma3_output_norm_gains_scale_the_contribution_and_untied_rows_are_compared() {
    let dir = tempdir();
    let out = dir.path().join("g.parquet");
    run_plugin_to(
        "probe-plugin-vshape",
        &fixture("gemma3-tied-f32"),
        &[],
        &out,
    );
    let table = read_parquet(&out);
    let scale: Vec<f64> = table
        .column("attn_scale")
        .unwrap()
        .f64()
        .unwrap()
        .into_no_null_iter()
        .collect();
    // Gemma's post-attention norm multiplies by (1 + w) with w near 0.
    assert!(
        scale.iter().all(|&s| s != 1.0 && (s - 1.0).abs() < 0.5),
        "{scale:?}"
    );
    let out = dir.path().join("l.parquet");
    run_plugin_to(
        "probe-plugin-vshape",
        &fixture("llama-untied-bf16"),
        &[],
        &out,
    );
    let summary = read_parquet(&dir.path().join("l.summary.parquet"));
    assert_eq!(
        summary
            .column("tied_embeddings")
            .unwrap()
            .get(0)
            .unwrap()
            .to_string(),
        "false"
    );
    let cos = summary
        .column("embed_lm_head_row_cosine")
        .unwrap()
        .get(0)
        .unwrap()
        .extract::<f64>()
        .unwrap();
    assert!(cos.abs() < 0.5, "independent random rows: {cos}");
}

#[test]
fn smollm2_has_both_profiles_and_a_run_gives_one_table() {
    let Some(model) = real_model("SmolLM2-135M-Instruct") else {
        return;
    };
    let dir = tempdir();
    let out = dir.path().join("v.parquet");
    run_plugin_to(
        "probe-plugin-vshape",
        &model,
        &["activations=true", "max_tokens=16"],
        &out,
    );
    let table = read_parquet(&out);
    assert_eq!(table.height(), 30);
    for name in ["eff_total", "update_ratio_attn", "update_ratio_mlp"] {
        let values: Vec<f64> = table
            .column(name)
            .unwrap()
            .f64()
            .unwrap()
            .into_no_null_iter()
            .collect();
        assert!(
            values.iter().all(|v| v.is_finite() && *v > 0.0),
            "{name}: {values:?}"
        );
    }
    let shares: f64 = table
        .column("share")
        .unwrap()
        .f64()
        .unwrap()
        .into_no_null_iter()
        .sum();
    assert!((shares - 1.0).abs() < 1e-9);

    // Two checkpoints of one run: one table with a checkpoint column.
    let run = dir.path().join("run");
    for step in ["step-100", "step-200"] {
        crate::util::copy_dir(&fixture("paramgolf-tied-f32"), &run.join(step));
    }
    let out = dir.path().join("run.parquet");
    run_plugin_to("probe-plugin-vshape", &run, &[], &out);
    let table = read_parquet(&out);
    let checkpoints: Vec<String> = (0..table.height())
        .map(|r| {
            table
                .column("checkpoint")
                .unwrap()
                .get(r)
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(checkpoints.len(), 8, "4 blocks × 2 checkpoints");
    assert!(checkpoints[..4].iter().all(|c| c.contains("step-100")));
    assert!(checkpoints[4..].iter().all(|c| c.contains("step-200")));
    let summary = read_parquet(&dir.path().join("run.summary.parquet"));
    assert_eq!(summary.height(), 2);
}

#[test]
fn a_run_over_many_checkpoints_holds_one_at_a_time() {
    // A training run of four copies of SmolLM2 (links, no disk used), with
    // forward passes: peak memory stays that of one checkpoint, since each
    // is opened, run and dropped (mapping, engine, sessions) in turn.
    let Some(model) = real_model("SmolLM2-135M-Instruct") else {
        return;
    };
    let dir = tempdir();
    let run = dir.path().join("run");
    for step in 0..4 {
        let member = run.join(format!("step-{step}"));
        std::fs::create_dir_all(&member).unwrap();
        for entry in std::fs::read_dir(&model).unwrap() {
            let path = entry.unwrap().path();
            if path.is_file() {
                std::os::unix::fs::symlink(&path, member.join(path.file_name().unwrap())).unwrap();
            }
        }
    }
    let prompts = dir.path().join("prompts.txt");
    std::fs::write(
        &prompts,
        "The capital of France is Paris.\nOne, two, three, four.\n",
    )
    .unwrap();
    let vshape = crate::util::plugin_lib("probe-plugin-vshape");
    let peak = |path: &std::path::Path| {
        let out = dir.path().join("v.parquet");
        let (code, kb) = crate::util::probe_peak_rss([
            "run".as_ref(),
            "--plugin".as_ref(),
            vshape.as_os_str(),
            path.as_os_str(),
            "--param".as_ref(),
            "activations=true".as_ref(),
            "--param".as_ref(),
            std::ffi::OsStr::new(&format!("prompts={}", prompts.display())),
            "--param".as_ref(),
            "max_tokens=16".as_ref(),
            "--out".as_ref(),
            out.as_os_str(),
            "-q".as_ref(),
        ]);
        assert_eq!(code, Some(0));
        kb
    };
    let one = peak(&run.join("step-0"));
    let four = peak(&run);
    assert!(
        (four as f64) <= 1.25 * one as f64,
        "peak RSS of four checkpoints {four} kB vs one {one} kB"
    );
}
