//! The autopsy plugin: every column against a direct computation from the
//! engine's attention maps, updates and residuals, on every decoder family
//! and BERT; a long prompt whose maps are gathered a few blocks at a time.

use probe::forward::{text::TextCodec, Capture, Engine, EngineOptions, Request};
use probe::store::Checkpoint;

use crate::geometry::{gram, jacobi_eigenvalues};
use crate::knockout::{sequences, SET};
use crate::real_models::real_model;
use crate::util::{
    column_f64, column_i64, family_with_tokenizer, read_parquet, run_plugin_to, tempdir,
    DECODER_FIXTURES,
};

const PLUGIN: &str = "probe-plugin-autopsy";

const COLUMNS: [&str; 15] = [
    "attention_entropy",
    "residual_mean",
    "residual_std",
    "residual_rms",
    "attn_update_mean",
    "attn_update_std",
    "attn_update_rms",
    "mlp_update_mean",
    "mlp_update_std",
    "mlp_update_rms",
    "erank",
    "norm_growth",
    "first_position_share",
    "first_position_norm_ratio",
    "tokens",
];

fn mean_std_rms(values: &[f64]) -> [f64; 3] {
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
    let rms = (values.iter().map(|v| v * v).sum::<f64>() / n).sqrt();
    [mean, var.sqrt(), rms]
}

/// Per block, the 15 columns and the per-head entropies, from traces.
fn direct(traces: &[probe::forward::Trace]) -> (Vec<[f64; 15]>, Vec<Vec<f64>>) {
    let blocks = traces[0].blocks.len();
    let (d, heads) = (traces[0].hidden, traces[0].heads);
    let mut rows = Vec::new();
    let mut per_head = Vec::new();
    for l in 0..blocks {
        let (mut head_sum, mut queries) = (vec![0.0; heads], 0.0);
        let (mut res, mut attn, mut mlp) = (Vec::new(), Vec::new(), Vec::new());
        let (mut growth, mut tokens, mut first, mut all, mut firsts) = (0.0, 0.0, 0.0, 0.0, 0.0);
        let mut states: Vec<Vec<f64>> = Vec::new();
        for trace in traces {
            let t = trace.tokens.len();
            let map = &trace.attention[l];
            for (h, sum) in head_sum.iter_mut().enumerate() {
                for i in 0..t {
                    for j in 0..t {
                        let a = f64::from(map[(h * t + i) * t + j]);
                        if a > 0.0 {
                            *sum -= a * a.ln();
                        }
                    }
                }
            }
            queries += t as f64;
            let to64 = |v: &[f32]| v.iter().map(|&x| f64::from(x)).collect::<Vec<f64>>();
            res.extend(to64(&trace.residuals[l + 1]));
            attn.extend(to64(&trace.attn_updates[l]));
            mlp.extend(to64(&trace.mlp_updates[l]));
            for p in 0..t {
                let norm = |s: &[f32]| {
                    s[p * d..(p + 1) * d]
                        .iter()
                        .map(|&x| f64::from(x).powi(2))
                        .sum::<f64>()
                        .sqrt()
                };
                let (before, after) = (norm(&trace.residuals[l]), norm(&trace.residuals[l + 1]));
                growth += after / before;
                tokens += 1.0;
                all += after;
                if p == 0 {
                    first += after;
                    firsts += 1.0;
                }
                states.push(to64(&trace.residuals[l + 1][p * d..(p + 1) * d]));
            }
        }
        let sigma: Vec<f64> = jacobi_eigenvalues(gram(&states, d), d)
            .into_iter()
            .map(f64::sqrt)
            .collect();
        let total: f64 = sigma.iter().sum();
        let erank = (-sigma
            .iter()
            .filter(|&&s| s > 0.0)
            .map(|s| (s / total) * (s / total).ln())
            .sum::<f64>())
        .exp();
        let [rm, rs, rr] = mean_std_rms(&res);
        let [am, as_, ar] = mean_std_rms(&attn);
        let [mm, ms, mr] = mean_std_rms(&mlp);
        rows.push([
            head_sum.iter().sum::<f64>() / (queries * heads as f64),
            rm,
            rs,
            rr,
            am,
            as_,
            ar,
            mm,
            ms,
            mr,
            erank,
            growth / tokens,
            first / all,
            (first / firsts) / ((all - first) / (tokens - firsts)),
            tokens,
        ]);
        per_head.push(head_sum.iter().map(|s| s / queries).collect());
    }
    (rows, per_head)
}

fn traces_of(engine: &mut Engine, sequences: &[Vec<u32>]) -> Vec<probe::forward::Trace> {
    sequences
        .iter()
        .map(|tokens| {
            engine
                .run(&Request {
                    tokens,
                    capture: Capture {
                        residuals: true,
                        updates: true,
                        attention: true,
                        ..Capture::default()
                    },
                    ..Request::default()
                })
                .unwrap()
        })
        .collect()
}

fn check(
    family: &str,
    table: &polars::prelude::DataFrame,
    heads: &polars::prelude::DataFrame,
    traces: &[probe::forward::Trace],
) {
    let (want, want_heads) = direct(traces);
    assert_eq!(
        column_i64(table, "layer"),
        (0..want.len() as i64).collect::<Vec<_>>()
    );
    for (k, name) in COLUMNS.iter().enumerate() {
        let got: Vec<f64> = if *name == "tokens" {
            column_i64(table, name).iter().map(|&v| v as f64).collect()
        } else {
            column_f64(table, name)
        };
        for (l, row) in want.iter().enumerate() {
            // The mean of values that cancel carries their scale's rounding.
            let scale = if name.ends_with("_mean") {
                row[k + 1].max(row[k + 2])
            } else {
                row[k].abs()
            };
            assert!(
                (got[l] - row[k]).abs() <= 1e-6 * scale.max(1.0),
                "{family} block {l} {name}: plugin {}, direct {}",
                got[l],
                row[k]
            );
        }
    }
    let (layer, head, entropy) = (
        column_i64(heads, "layer"),
        column_i64(heads, "head"),
        column_f64(heads, "attention_entropy"),
    );
    for r in 0..heads.height() {
        let want = want_heads[layer[r] as usize][head[r] as usize];
        assert!(
            (entropy[r] - want).abs() <= 1e-6,
            "{family} head {r}: {} vs {want}",
            entropy[r]
        );
    }
    assert_eq!(heads.height(), want_heads.len() * want_heads[0].len());
}

#[test]
fn every_column_matches_a_direct_computation_on_every_family() {
    for family in DECODER_FIXTURES.iter().chain(&["bert-f32"]) {
        eprintln!("{family}");
        let dir = tempdir();
        let model = family_with_tokenizer(dir.path(), family);
        let set = dir.path().join("prompts.jsonl");
        std::fs::write(&set, SET).unwrap();
        let out = run_plugin_to(
            PLUGIN,
            &model,
            &[&format!("prompts={}", set.display())],
            &dir.path().join("autopsy.parquet"),
        );
        let table = read_parquet(&out);
        let heads = read_parquet(&dir.path().join("autopsy.heads.parquet"));
        let checkpoint = Checkpoint::open(&model).unwrap();
        let codec = TextCodec::open(&checkpoint.dir).unwrap();
        let mut engine = Engine::open(&checkpoint, EngineOptions::default()).unwrap();
        let tokens: Vec<Vec<u32>> = sequences(&codec).into_iter().map(|(t, _)| t).collect();
        let traces = traces_of(&mut engine, &tokens);
        check(family, &table, &heads, &traces);
    }
}

/// A prompt long enough that its maps over every block pass the plugin's
/// 256 MiB budget is measured from re-runs a few blocks at a time, to the
/// same numbers.
#[test]
fn a_long_prompt_gets_its_attention_a_few_blocks_at_a_time() {
    let dir = tempdir();
    let model = family_with_tokenizer(dir.path(), "llama-tied-f32");
    let checkpoint = Checkpoint::open(&model).unwrap();
    let mut engine = Engine::open(&checkpoint, EngineOptions::default()).unwrap();
    let heads = engine.arch.heads;
    let blocks = engine.num_blocks();
    // 4 · heads · t² · blocks > 256 MiB, 4 · heads · t² < 256 MiB.
    let t = ((256usize << 20) as f64 / (4.0 * heads as f64 * blocks as f64)).sqrt() as usize + 8;
    let words: Vec<&str> = ["the", "cat", "sat", "on", "mat"]
        .iter()
        .copied()
        .cycle()
        .take(t)
        .collect();
    let set = dir.path().join("long.jsonl");
    std::fs::write(
        &set,
        format!(
            "{{\"category\": \"long\", \"prompt\": \"{}\", \"completion\": \"warm\"}}\n",
            words.join(" ")
        ),
    )
    .unwrap();
    let out = run_plugin_to(
        PLUGIN,
        &model,
        &[&format!("prompts={}", set.display())],
        &dir.path().join("autopsy.parquet"),
    );
    let table = read_parquet(&out);
    let heads_table = read_parquet(&dir.path().join("autopsy.heads.parquet"));
    let codec = TextCodec::open(&checkpoint.dir).unwrap();
    let mut tokens = codec.encode(&words.join(" ")).unwrap();
    tokens.extend(codec.encode_continuation("warm").unwrap());
    assert!(4 * heads * tokens.len().pow(2) * blocks > 256 << 20);
    let traces = traces_of(&mut engine, &[tokens]);
    check("llama long", &table, &heads_table, &traces);
}

/// SmolLM2 on two prompts: block 11's MLP writes a massive activation at
/// the first position (an attention sink) that block 28 undoes.
#[test]
fn smollm2_has_a_first_position_sink_from_block_11_to_27() {
    let Some(model) = real_model("SmolLM2-135M-Instruct") else {
        return;
    };
    let dir = tempdir();
    let set = crate::util::two_real_prompts(dir.path());
    let out = run_plugin_to(
        PLUGIN,
        &model,
        &[&format!("prompts={}", set.display())],
        &dir.path().join("autopsy.parquet"),
    );
    let table = read_parquet(&out);
    let ratio = column_f64(&table, "first_position_norm_ratio");
    assert_eq!(ratio.len(), 30);
    assert!(ratio[10] < 5.0 && ratio[11] > 20.0, "{ratio:?}");
    assert!((11..28).all(|l| ratio[l] > 10.0), "{ratio:?}");
    assert!(ratio[29] < ratio[27] / 2.0, "{ratio:?}");
}

/// A training run — a folder of checkpoints, here two of one shape with
/// different weights (the llama fixture in f32 and its untied bf16 sibling)
/// — gives one table with a `checkpoint` column, steps in natural order,
/// each checkpoint's rows (and its `heads`) those of its own run; the report
/// draws a line per checkpoint.
#[test]
fn a_training_run_is_one_table_by_checkpoint() {
    let dir = tempdir();
    let set = dir.path().join("prompts.jsonl");
    std::fs::write(&set, SET).unwrap();
    let run = dir.path().join("run");
    std::fs::create_dir_all(&run).unwrap();
    let steps = [
        ("step-900", "llama-tied-f32"),
        ("step-1000", "llama-untied-bf16"),
    ];
    let mut alone = Vec::new();
    for (step, family) in steps {
        let model = family_with_tokenizer(dir.path(), family);
        std::fs::rename(&model, run.join(step)).unwrap();
        let out = run_plugin_to(
            PLUGIN,
            &run.join(step),
            &[&format!("prompts={}", set.display())],
            &dir.path().join(format!("{step}.parquet")),
        );
        alone.push(read_parquet(&out));
    }
    let out = run_plugin_to(
        PLUGIN,
        &run,
        &[&format!("prompts={}", set.display())],
        &dir.path().join("run.parquet"),
    );
    let table = read_parquet(&out);
    let heads = read_parquet(&dir.path().join("run.heads.parquet"));
    let blocks = alone[0].height();
    assert_eq!(table.height(), 2 * blocks);
    let checkpoints = crate::util::column_str(&table, "checkpoint");
    // Natural order: step-900 before step-1000.
    assert!(
        checkpoints[..blocks].iter().all(|c| c.contains("step-900")),
        "{checkpoints:?}"
    );
    assert!(
        checkpoints[blocks..]
            .iter()
            .all(|c| c.contains("step-1000")),
        "{checkpoints:?}"
    );
    let head_checkpoints = crate::util::column_str(&heads, "checkpoint");
    assert!(head_checkpoints.iter().any(|c| c.contains("step-1000")));
    for name in COLUMNS.iter().filter(|c| **c != "tokens") {
        let got = column_f64(&table, name);
        for (k, single) in alone.iter().enumerate() {
            let want = column_f64(single, name);
            assert_eq!(
                &got[k * blocks..(k + 1) * blocks],
                &want[..],
                "{name} of {}",
                steps[k].0
            );
        }
    }
    let entropy = column_f64(&table, "attention_entropy");
    assert_ne!(entropy[0], entropy[blocks], "the two checkpoints differ");

    let html = dir.path().join("report.html");
    crate::util::probe([
        "report".as_ref(),
        out.as_os_str(),
        "-o".as_ref(),
        html.as_os_str(),
    ])
    .ok();
    let page = std::fs::read_to_string(&html).unwrap();
    assert!(page.contains("step-900") && page.contains("step-1000"));
}
