//! The quant plugin and the engine's tensor overrides: every loss, weight
//! error and recipe against engine runs with weights rounded by hand here,
//! on every decoder fixture family; overrides in one batch kept apart.

use probe::forward::{text::TextCodec, Capture, Engine, EngineOptions, Request, WeightOverride};
use probe::store::Checkpoint;
use probe::Schema;

use crate::knockout::{sequences, SET};
use crate::real_models::real_model;
use crate::util::{
    column_f64, column_i64, column_str, family_with_tokenizer, read_parquet, run_plugin,
    run_plugin_to, tempdir, DECODER_FIXTURES,
};

const PLUGIN: &str = "probe-plugin-quant";

/// The definition, written out: every logical row (Linear's out × in; a
/// Conv1D tensor is stored in × out) in groups of `group` along its input
/// axis, scale = max|w| / (2^(b−1) − 1), round half to even, clamp.
fn round_by_hand(
    values: &[f32],
    shape: &[usize],
    transposed: bool,
    bits: u32,
    group: usize,
) -> Vec<f32> {
    let (stored_rows, stored_cols) = (shape[0], shape[1]);
    let (rows, cols) = if transposed {
        (stored_cols, stored_rows)
    } else {
        (stored_rows, stored_cols)
    };
    let at = |r: usize, c: usize| {
        if transposed {
            c * stored_cols + r
        } else {
            r * stored_cols + c
        }
    };
    let qmax = (2i32.pow(bits - 1) - 1) as f32;
    let qmin = -(2i32.pow(bits - 1) as f32);
    let mut out = values.to_vec();
    for r in 0..rows {
        for start in (0..cols).step_by(group) {
            let end = (start + group).min(cols);
            let max = (start..end)
                .map(|c| values[at(r, c)].abs())
                .fold(0.0f32, f32::max);
            if max == 0.0 {
                continue;
            }
            let scale = max / qmax;
            for c in start..end {
                let q = (values[at(r, c)] / scale).round_ties_even();
                out[at(r, c)] = q.max(qmin).min(qmax) * scale;
            }
        }
    }
    out
}

/// Each block's 2-D weight tensors: (block, name, role, shape).
fn block_matrices(checkpoint: &Checkpoint) -> Vec<(usize, String, String, Vec<usize>)> {
    let schema = Schema::of(checkpoint);
    checkpoint
        .tensors()
        .iter()
        .zip(&schema.placements)
        .filter_map(|(t, p)| {
            let layer = p.layer?;
            (!p.bias && p.role.is_weight_matrix() && t.shape.len() == 2)
                .then(|| (layer, t.name.clone(), p.role.to_string(), t.shape.clone()))
        })
        .collect()
}

/// The token-weighted loss over [`SET`]'s completions with these overrides.
fn loss_with(
    engine: &mut Engine,
    sequences: &[(Vec<u32>, usize)],
    overrides: &[(String, Vec<f32>)],
) -> f64 {
    let weights: Vec<WeightOverride> = overrides
        .iter()
        .map(|(tensor, values)| WeightOverride { tensor, values })
        .collect();
    let (mut sum, mut n) = (0.0, 0usize);
    for (tokens, prompt_len) in sequences {
        let trace = engine
            .run(&Request {
                tokens,
                capture: Capture {
                    logits: true,
                    ..Capture::default()
                },
                overrides: &weights,
                ..Request::default()
            })
            .unwrap();
        let losses = trace.token_losses().unwrap();
        let scored = &losses[prompt_len - 1..tokens.len() - 1];
        sum += scored.iter().sum::<f64>();
        n += scored.len();
    }
    sum / n as f64
}

#[test]
fn every_loss_weight_error_and_recipe_matches_weights_rounded_by_hand() {
    for family in DECODER_FIXTURES {
        eprintln!("{family}");
        check_quant(family);
    }
}

fn check_quant(family: &str) {
    let dir = tempdir();
    let model = family_with_tokenizer(dir.path(), family);
    let set = dir.path().join("prompts.jsonl");
    std::fs::write(&set, SET).unwrap();
    let out = dir.path().join("quant.parquet");
    // Group 5: fixture rows (16, 32, 64 long) end in a short group.
    let (group, bits) = (5usize, [2u32, 4]);
    run_plugin_to(
        PLUGIN,
        &model,
        &[
            &format!("prompts={}", set.display()),
            "bits=2,4",
            "group=5",
            "scope=both",
            "protect=1",
        ],
        &out,
    );
    let table = read_parquet(&out);
    let recipes = read_parquet(&dir.path().join("quant.recipes.parquet"));

    let checkpoint = Checkpoint::open(&model).unwrap();
    let transposed = Schema::of(&checkpoint).family.stores_transposed();
    let codec = TextCodec::open(&checkpoint.dir).unwrap();
    let mut engine = Engine::open(&checkpoint, EngineOptions::default()).unwrap();
    let n = engine.num_blocks();
    let sequences = sequences(&codec);
    let base = loss_with(&mut engine, &sequences, &[]);
    let matrices = block_matrices(&checkpoint);
    let stored = |name: &str| checkpoint.tensor(name).unwrap().to_f32().unwrap().to_vec();
    // (overrides, ‖ΔW‖², ‖W‖²) for the given matrices at `bits`.
    let rounded = |chosen: &[&(usize, String, String, Vec<usize>)], bits: u32| {
        let (mut changed, mut original) = (0.0f64, 0.0f64);
        let overrides: Vec<(String, Vec<f32>)> = chosen
            .iter()
            .map(|(_, name, _, shape)| {
                let w = stored(name);
                let q = round_by_hand(&w, shape, transposed, bits, group);
                for (a, b) in q.iter().zip(&w) {
                    changed += f64::from(a - b).powi(2);
                    original += f64::from(*b).powi(2);
                }
                (name.clone(), q)
            })
            .collect();
        (overrides, changed, original)
    };
    let close = |what: &str, got: f64, want: f64| {
        assert!(
            (got - want).abs() <= 1e-5 * want.abs().max(1.0),
            "{family} {what}: plugin {got}, by hand {want}"
        );
    };

    let (scope, layer, role, width) = (
        column_str(&table, "scope"),
        column_i64(&table, "layer"),
        column_str(&table, "role"),
        column_i64(&table, "bits"),
    );
    let (loss, ppl, delta, ratio, error) = (
        column_f64(&table, "loss"),
        column_f64(&table, "perplexity"),
        column_f64(&table, "delta_ppl"),
        column_f64(&table, "ratio"),
        column_f64(&table, "weight_error"),
    );
    let block_rows = scope.iter().filter(|s| *s == "block").count();
    assert_eq!(block_rows, n * bits.len());
    let mut block_delta = vec![[0.0f64; 2]; n];
    let mut checked_matrix = false;
    for r in 0..table.height() {
        let (l, b) = (layer[r] as usize, width[r] as u32);
        let chosen: Vec<_> = matrices
            .iter()
            .filter(|m| m.0 == l && (scope[r] == "block" || m.2 == role[r]))
            .collect();
        // A fused QKV tensor (GPT-2's c_attn) is one `qkv` tensor here; the
        // plugin splits it into q, k and v, whose rounding the block rows
        // (which round all three) check.
        let fused = matrices.iter().any(|m| m.0 == l && m.2 == "qkv");
        if chosen.is_empty() && fused && ["q", "k", "v"].contains(&role[r].as_str()) {
            continue;
        }
        assert!(
            !chosen.is_empty() && (scope[r] == "block" || chosen.len() == 1),
            "row {r}: {} {l} {}",
            scope[r],
            role[r]
        );
        let (overrides, changed, original) = rounded(&chosen, b);
        let want = loss_with(&mut engine, &sequences, &overrides);
        let what = format!("{} block {l} {} at {b} bits", scope[r], role[r]);
        close(&format!("{what} loss"), loss[r], want);
        // Perplexities carry the loss's rounding times exp(loss).
        let ppl_close = |what: &str, got: f64, wanted: f64| {
            assert!(
                (got - wanted).abs() <= 1e-5 * want.exp(),
                "{family} {what}: plugin {got}, by hand {wanted}"
            );
        };
        ppl_close(&format!("{what} perplexity"), ppl[r], want.exp());
        ppl_close(
            &format!("{what} delta_ppl"),
            delta[r],
            want.exp() - base.exp(),
        );
        close(&format!("{what} ratio"), ratio[r], want / base);
        close(
            &format!("{what} weight_error"),
            error[r],
            (changed / original).sqrt(),
        );
        if scope[r] == "block" {
            block_delta[l][usize::from(b == 4)] = want - base;
        } else {
            checked_matrix = true;
        }
    }
    assert!(checked_matrix || transposed);
    // Two bits moves every block's loss: the test would see a no-op.
    assert!(
        block_delta.iter().all(|d| d[0].abs() > 1e-4),
        "{family}: {block_delta:?}"
    );

    // Recipes: all at b; the ends kept at 8; the one block of highest
    // Δloss at b kept at 8 (protect=1).
    let (r_bits, r_name, r_protected, r_loss, r_error) = (
        column_i64(&recipes, "bits"),
        column_str(&recipes, "recipe"),
        column_str(&recipes, "protected"),
        column_f64(&recipes, "loss"),
        column_f64(&recipes, "weight_error"),
    );
    assert_eq!(
        r_name,
        ["all", "protect_ends", "protect_sensitive"].repeat(2)
    );
    for r in 0..recipes.height() {
        let b = r_bits[r] as u32;
        let column = usize::from(b == 4);
        let kept: Vec<usize> = match r_name[r].as_str() {
            "all" => vec![],
            "protect_ends" => vec![0, n - 1],
            _ => vec![(0..n).fold(0, |m, l| {
                if block_delta[l][column] > block_delta[m][column] {
                    l
                } else {
                    m
                }
            })],
        };
        let want_protected: Vec<String> = kept.iter().map(usize::to_string).collect();
        assert_eq!(
            r_protected[r],
            want_protected.join(","),
            "{family} recipe {r}"
        );
        let (mut overrides, mut changed, mut original) = (Vec::new(), 0.0, 0.0);
        for l in 0..n {
            let chosen: Vec<_> = matrices.iter().filter(|m| m.0 == l).collect();
            let (o, c, w) = rounded(&chosen, if kept.contains(&l) { 8 } else { b });
            overrides.extend(o);
            changed += c;
            original += w;
        }
        let want = loss_with(&mut engine, &sequences, &overrides);
        close(&format!("recipe {} at {b}", r_name[r]), r_loss[r], want);
        close(
            &format!("recipe {} at {b} weight_error", r_name[r]),
            r_error[r],
            (changed / original).sqrt(),
        );
    }
}

/// Requests of one batch with different overrides of the same block never
/// share its session run, and a batch gives what each request alone gives.
#[test]
fn overrides_in_one_batch_stay_apart_and_bad_ones_are_refused() {
    let dir = tempdir();
    let model = family_with_tokenizer(dir.path(), "llama-tied-f32");
    let checkpoint = Checkpoint::open(&model).unwrap();
    let mut engine = Engine::open(&checkpoint, EngineOptions::default()).unwrap();
    let matrices = block_matrices(&checkpoint);
    let (_, name, _, _) = matrices.iter().find(|m| m.0 == 1).unwrap();
    let w = checkpoint.tensor(name).unwrap().to_f32().unwrap().to_vec();
    let zeroed = vec![0.0f32; w.len()];
    let doubled: Vec<f32> = w.iter().map(|v| 2.0 * v).collect();
    let tokens = [1u32, 5, 9, 13, 17, 21];
    let request = |overrides| Request {
        tokens: &tokens,
        capture: Capture {
            logits: true,
            ..Capture::default()
        },
        overrides,
        ..Request::default()
    };
    let a = [WeightOverride {
        tensor: name,
        values: &zeroed,
    }];
    let b = [WeightOverride {
        tensor: name,
        values: &doubled,
    }];
    let before = engine.run(&request(&[])).unwrap().loss().unwrap();
    let batch = [request(&a), request(&b), request(&[]), request(&a)];
    let together = engine.run_batch(&batch).unwrap();
    let losses: Vec<f64> = together.iter().map(|t| t.loss().unwrap()).collect();
    for (i, r) in batch.iter().enumerate() {
        let alone = engine.run(r).unwrap().loss().unwrap();
        assert!(
            (losses[i] - alone).abs() < 1e-5,
            "request {i}: batched {} alone {alone}",
            losses[i]
        );
    }
    // The overrides matter, and differ from each other.
    assert!((losses[0] - losses[2]).abs() > 1e-3 && (losses[1] - losses[2]).abs() > 1e-3);
    assert!((losses[0] - losses[1]).abs() > 1e-3);
    assert!((losses[0] - losses[3]).abs() < 1e-6);
    // The stored weights are untouched: a plain run gives what it gave first.
    let after = engine.run(&request(&[])).unwrap().loss().unwrap();
    assert_eq!(before.to_bits(), after.to_bits());

    let refused = |o: WeightOverride| engine.check_override(&o).unwrap_err();
    let embed = checkpoint
        .tensors()
        .iter()
        .find(|t| t.name.contains("embed_tokens"))
        .unwrap()
        .name
        .clone();
    let e = vec![0.0f32; checkpoint.tensor(&embed).unwrap().entry.numel()];
    assert!(refused(WeightOverride {
        tensor: &embed,
        values: &e
    })
    .contains("not a block weight"));
    assert!(refused(WeightOverride {
        tensor: "nope",
        values: &e
    })
    .contains("no tensor `nope`"));
    assert!(refused(WeightOverride {
        tensor: name,
        values: &w[1..]
    })
    .contains("values; the tensor is"));
    let mut nan = w.clone();
    nan[3] = f32::NAN;
    assert!(refused(WeightOverride {
        tensor: name,
        values: &nan
    })
    .contains("non-finite value at flat index 3"));
}

#[test]
fn bad_parameters_and_encoders_are_refused_naming_the_problem() {
    let dir = tempdir();
    let model = family_with_tokenizer(dir.path(), "llama-tied-f32");
    let lib = crate::util::plugin_lib(PLUGIN).display().to_string();
    for (param, fragment) in [
        ("bits=9", "9 is outside the 2–8 bits"),
        ("group=0", "parameter `group`"),
        ("scope=rows", "scope"),
    ] {
        let run = run_plugin(&lib, &model, &[param], &["--quiet"]);
        assert_eq!(run.code, Some(2), "{param}: {}", run.stderr);
        assert!(run.stderr.contains(fragment), "{param}: {}", run.stderr);
    }
    let encoder = crate::util::fixture("bert-f32");
    let run = run_plugin(&lib, &encoder, &[], &["--quiet"]);
    assert_eq!(run.code, Some(2), "{}", run.stderr);
    assert!(run.stderr.contains("encoder"), "{}", run.stderr);
}

/// SmolLM2 at 2 bits, one block at a time, on two prompts: every Δppl is
/// finite, and block 0 is by far the most sensitive (published on Qwen3-4B:
/// the first blocks are catastrophically so at 2 bits).
#[test]
fn smollm2_block_zero_is_the_most_fragile_at_two_bits() {
    let Some(model) = real_model("SmolLM2-135M-Instruct") else {
        return;
    };
    let dir = tempdir();
    let set = crate::util::two_real_prompts(dir.path());
    let out = dir.path().join("quant.parquet");
    run_plugin_to(
        PLUGIN,
        &model,
        &[
            &format!("prompts={}", set.display()),
            "bits=2",
            "recipes=false",
        ],
        &out,
    );
    let table = read_parquet(&out);
    let delta = column_f64(&table, "delta_ppl");
    let error = column_f64(&table, "weight_error");
    assert_eq!(delta.len(), 30);
    assert!(delta.iter().all(|d| d.is_finite()), "{delta:?}");
    // Three levels per group of 128 leave ~77 % of a matrix's norm off.
    assert!(error.iter().all(|e| (0.7..0.85).contains(e)), "{error:?}");
    let mut order: Vec<usize> = (0..30).collect();
    order.sort_by(|&a, &b| delta[b].total_cmp(&delta[a]));
    assert_eq!(order[0], 0, "{delta:?}");
    assert!(delta[0] > 10.0 * delta[order[1]], "{delta:?}");
}
