//! The lens plugin and the shared prompt set: every column against a direct
//! computation from the engine's residuals and its full-vocabulary lens on a
//! fixture (given completions and a generated one); SmolLM2 on a few
//! prompts; bad sets.

use probe::forward::{text::TextCodec, Capture, Engine, EngineOptions, Request};
use probe::store::Checkpoint;

use crate::real_models::real_model;
use crate::util::{
    column_f64, column_i64, column_opt_f64, column_opt_i64, column_str, family_with_tokenizer,
    fixture, fixture_with_tokenizer, plugin_lib, read_parquet, run_plugin, run_plugin_to, tempdir,
    DECODER_FIXTURES,
};

const PLUGIN: &str = "probe-plugin-lens";

/// Two prompts with their completions, one for the model to complete, and
/// a blank line (indices are lines).
pub const FIXTURE_SET: &str = r#"{"category": "facts", "prompt": "the cat sat on the", "completion": "mat ."}

{"category": "weather", "prompt": "the day was", "completion": "very hot and dry"}
{"category": "facts", "prompt": "is it big"}
"#;

/// The reference lens of one logits row, in f64: rank and probability of
/// `target`, the top-1 (lowest id among equals), entropy, log-probabilities.
struct RowLens {
    rank: i64,
    prob: f64,
    top1: i64,
    top1_prob: f64,
    entropy: f64,
    log_p: Vec<f64>,
}

fn row_lens(logits: &[f32], target: usize) -> RowLens {
    let max = logits.iter().fold(f64::MIN, |m, &z| m.max(z as f64));
    let lse = max
        + logits
            .iter()
            .map(|&z| (z as f64 - max).exp())
            .sum::<f64>()
            .ln();
    let log_p: Vec<f64> = logits.iter().map(|&z| z as f64 - lse).collect();
    let top1 = (0..logits.len()).fold(0, |best, v| if logits[v] > logits[best] { v } else { best });
    RowLens {
        rank: logits.iter().filter(|&&z| z > logits[target]).count() as i64,
        prob: log_p[target].exp(),
        top1: top1 as i64,
        top1_prob: log_p[top1].exp(),
        entropy: -log_p.iter().map(|&l| l.exp() * l).sum::<f64>(),
        log_p,
    }
}

#[test]
fn every_column_matches_a_direct_computation_on_every_decoder_family() {
    for family in DECODER_FIXTURES {
        eprintln!("{family}");
        check_lens(family);
    }
}

fn check_lens(family: &str) {
    let dir = tempdir();
    let model = family_with_tokenizer(dir.path(), family);
    let set = dir.path().join("prompts.jsonl");
    std::fs::write(&set, FIXTURE_SET).unwrap();
    let out = dir.path().join("lens.parquet");
    run_plugin_to(
        PLUGIN,
        &model,
        &[&format!("prompts={}", set.display()), "completion_tokens=5"],
        &out,
    );
    let table = read_parquet(&out);
    let positions = read_parquet(&dir.path().join("lens.positions.parquet"));
    let tokens = read_parquet(&dir.path().join("lens.tokens.parquet"));
    let summary = read_parquet(&dir.path().join("lens.summary.parquet"));

    let checkpoint = Checkpoint::open(&model).unwrap();
    let codec = TextCodec::open(&checkpoint.dir).unwrap();
    let mut engine = Engine::open(&checkpoint, EngineOptions::default()).unwrap();
    let stages = engine.num_blocks() + 1;
    let hidden = engine.arch.hidden;

    // The sequences: prompt ++ completion (without special tokens); the
    // third line's completion is the model's own, 5 greedy tokens.
    let (t_index, t_position, t_id, t_scored) = (
        column_i64(&tokens, "prompt_index"),
        column_i64(&tokens, "position"),
        column_i64(&tokens, "token_id"),
        tokens
            .column("scored")
            .unwrap()
            .bool()
            .unwrap()
            .iter()
            .map(Option::unwrap)
            .collect::<Vec<bool>>(),
    );
    let lines = [
        (0, "the cat sat on the", Some("mat .")),
        (2, "the day was", Some("very hot and dry")),
        (3, "is it big", None),
    ];
    let mut sequences = Vec::new();
    for (index, prompt, completion) in lines {
        let rows: Vec<usize> = (0..t_index.len())
            .filter(|&r| t_index[r] == index)
            .collect();
        let ids: Vec<u32> = rows.iter().map(|&r| t_id[r] as u32).collect();
        assert!(rows
            .iter()
            .enumerate()
            .all(|(p, &r)| t_position[r] == p as i64));
        let prompt_ids = codec.encode(prompt).unwrap();
        let prompt_len = prompt_ids.len();
        assert_eq!(&ids[..prompt_len], &prompt_ids[..], "line {index}");
        match completion {
            Some(text) => {
                assert_eq!(
                    &ids[prompt_len..],
                    &codec.encode_continuation(text).unwrap()[..]
                )
            }
            None => {
                assert_eq!(ids.len(), prompt_len + 5, "5 generated tokens");
                // Greedy: each generated token is the argmax of the model's
                // output at the position before it, on the final sequence.
                let trace = engine
                    .run(&Request {
                        tokens: &ids,
                        capture: Capture {
                            logits: true,
                            ..Capture::default()
                        },
                        ..Request::default()
                    })
                    .unwrap();
                let logits = trace.logits.unwrap();
                let vocab = logits.len() / ids.len();
                for p in prompt_len - 1..ids.len() - 1 {
                    let best = row_lens(&logits[p * vocab..(p + 1) * vocab], 0).top1;
                    assert_eq!(best, ids[p + 1] as i64, "generated token at {}", p + 1);
                }
            }
        }
        let scored: Vec<bool> = rows.iter().map(|&r| t_scored[r]).collect();
        let want: Vec<bool> = (0..ids.len())
            .map(|p| p + 1 >= prompt_len && p + 1 < ids.len())
            .collect();
        assert_eq!(scored, want, "line {index}: scored positions");
        sequences.push((index, ids, prompt_len));
    }

    // Every (position, layer) row against the full-vocabulary lens.
    let (index, position, layer) = (
        column_i64(&table, "prompt_index"),
        column_i64(&table, "position"),
        column_i64(&table, "layer"),
    );
    let (target, rank, top1) = (
        column_i64(&table, "target"),
        column_i64(&table, "target_rank"),
        column_i64(&table, "top1"),
    );
    let (prob, top1_prob, entropy, kl) = (
        column_f64(&table, "target_prob"),
        column_f64(&table, "top1_prob"),
        column_f64(&table, "entropy"),
        column_f64(&table, "kl_to_final"),
    );
    let category = column_str(&table, "category");
    let mut row = 0;
    let mut crystal_want = Vec::new();
    let mut worst = 0.0f64;
    for (line, ids, prompt_len) in &sequences {
        let trace = engine
            .run(&Request {
                tokens: ids,
                capture: Capture {
                    residuals: true,
                    ..Capture::default()
                },
                ..Request::default()
            })
            .unwrap();
        for p in prompt_len - 1..ids.len() - 1 {
            let next = ids[p + 1] as usize;
            let lenses: Vec<RowLens> = (0..stages)
                .map(|stage| {
                    let residual = &trace.residuals[stage][p * hidden..(p + 1) * hidden];
                    row_lens(&engine.lens(residual, 1).unwrap(), next)
                })
                .collect();
            let final_log_p = &lenses[stages - 1].log_p;
            let mut ranks = Vec::new();
            for (stage, lens) in lenses.iter().enumerate() {
                let at = format!("line {line} position {p} layer {}", stage as i64 - 1);
                assert_eq!(index[row], *line, "{at}");
                assert_eq!(
                    category[row],
                    if *line == 2 { "weather" } else { "facts" },
                    "{at}"
                );
                assert_eq!((position[row], layer[row]), (p as i64, stage as i64 - 1));
                assert_eq!(target[row], next as i64, "{at}");
                assert_eq!(rank[row], lens.rank, "{at}: rank");
                assert_eq!(top1[row], lens.top1, "{at}: top1");
                let kl_want: f64 = final_log_p
                    .iter()
                    .zip(&lens.log_p)
                    .map(|(&lf, &ll)| lf.exp() * (lf - ll))
                    .sum();
                for (what, got, want) in [
                    ("target_prob", prob[row], lens.prob),
                    ("top1_prob", top1_prob[row], lens.top1_prob),
                    ("entropy", entropy[row], lens.entropy),
                    ("kl_to_final", kl[row], kl_want),
                ] {
                    let error = (got - want).abs();
                    worst = worst.max(error);
                    assert!(error < 1e-5, "{at}: {what} {got} vs {want}");
                }
                ranks.push(lens.rank);
                row += 1;
            }
            // Crystallization by its definition, scanned forwards: the
            // first layer from which every later rank is below 10.
            let crystal = (0..stages)
                .find(|&s| ranks[s..].iter().all(|&r| r < 10))
                .map(|s| s as i64 - 1);
            let first_top1 = ranks.iter().position(|&r| r == 0).map(|s| s as i64 - 1);
            crystal_want.push((*line, p as i64, crystal, first_top1));
        }
    }
    assert_eq!(row, table.height(), "one row per scored position and layer");
    assert!(kl[stages - 1].abs() < 1e-9, "the last layer is the output");
    eprintln!("lens: worst difference {worst:.1e}");

    let got: Vec<(i64, i64, Option<i64>, Option<i64>)> = column_i64(&positions, "prompt_index")
        .into_iter()
        .zip(column_i64(&positions, "position"))
        .zip(column_opt_i64(&positions, "crystallization_layer"))
        .zip(column_opt_i64(&positions, "first_top1_layer"))
        .map(|(((a, b), c), d)| (a, b, c, d))
        .collect();
    assert_eq!(got, crystal_want);
    // The generated completion is the model's argmax: rank 0 at the output.
    let final_rank = column_i64(&positions, "final_rank");
    for (k, &(line, ..)) in crystal_want.iter().enumerate() {
        if line == 3 {
            assert_eq!(final_rank[k], 0, "generated position {k}");
        }
    }
    // Summary: the mean over the positions that crystallize, per category.
    let mean = |rows: Vec<&(i64, i64, Option<i64>, Option<i64>)>| {
        let layers: Vec<f64> = rows.iter().filter_map(|r| r.2).map(|l| l as f64).collect();
        (!layers.is_empty()).then(|| layers.iter().sum::<f64>() / layers.len() as f64)
    };
    assert_eq!(
        column_str(&summary, "category"),
        ["facts", "weather", "all"]
    );
    let want = [
        mean(crystal_want.iter().filter(|r| r.0 != 2).collect()),
        mean(crystal_want.iter().filter(|r| r.0 == 2).collect()),
        mean(crystal_want.iter().collect()),
    ];
    let got = column_opt_f64(&summary, "mean_crystallization_layer");
    for (g, w) in got.iter().zip(want) {
        match (g, w) {
            (Some(g), Some(w)) => assert!((g - w).abs() < 1e-12, "{g} vs {w}"),
            (g, w) => assert_eq!(*g, w),
        }
    }
}

#[test]
fn bad_prompt_sets_name_the_file_and_the_line() {
    let dir = tempdir();
    let model = fixture_with_tokenizer(dir.path());
    let lib = plugin_lib(PLUGIN);
    let lib = lib.to_str().unwrap();
    let cases = [
        (
            "{\"category\": \"a\", \"prompt\": \"the cat\"}\n{\"category\": \"a\", \"promt\": \"x\"}\n",
            "line 2: not a prompt object",
        ),
        ("{\"category\": \"a\", \"prompt\": \"the cat\", \"completion\": \"\"}", "line 1: empty `completion`"),
        ("", "no prompts"),
    ];
    for (i, (text, wanted)) in cases.iter().enumerate() {
        let set = dir.path().join(format!("set{i}.jsonl"));
        std::fs::write(&set, text).unwrap();
        run_plugin(
            lib,
            &model,
            &[&format!("prompts={}", set.display())],
            &["-q"],
        )
        .fails_with(&[&set.display().to_string(), wanted]);
    }
    let missing = dir.path().join("absent.jsonl");
    run_plugin(
        lib,
        &model,
        &[&format!("prompts={}", missing.display())],
        &["-q"],
    )
    .fails_with(&[&missing.display().to_string(), "cannot read the prompt set"]);
    run_plugin(lib, &model, &["completion_tokens=0"], &["-q"])
        .fails_with(&["completion_tokens", "not between 1 and 4096"]);
    run_plugin(lib, &fixture("bert-f32"), &[], &["-q"])
        .fails_with(&["is an encoder (bert)", "no logit lens"]);
}

/// SmolLM2 on three prompts of the built-in set's kinds, 4 generated tokens
/// each: the output is the model's argmax at every generated position, the
/// last layer's KL to the output is 0, and every row is there.
#[test]
fn smollm2_generates_and_reads_its_own_completions() {
    let Some(model) = real_model("SmolLM2-135M-Instruct") else {
        return;
    };
    let dir = tempdir();
    let set = dir.path().join("three.jsonl");
    std::fs::write(
        &set,
        "{\"category\": \"factual\", \"prompt\": \"The capital of France is\"}\n\
         {\"category\": \"code\", \"prompt\": \"def add(a, b):\\n    return\"}\n\
         {\"category\": \"linguistic\", \"prompt\": \"The plural of mouse is\", \"completion\": \" mice.\"}\n",
    )
    .unwrap();
    let out = dir.path().join("lens.parquet");
    run_plugin_to(
        PLUGIN,
        &model,
        &[&format!("prompts={}", set.display()), "completion_tokens=4"],
        &out,
    );
    let table = read_parquet(&out);
    let positions = read_parquet(&dir.path().join("lens.positions.parquet"));
    let index = column_i64(&positions, "prompt_index");
    let final_rank = column_i64(&positions, "final_rank");
    assert_eq!(
        index.iter().filter(|&&i| i < 2).count(),
        8,
        "4 scored per generated prompt"
    );
    for (i, rank) in index.iter().zip(&final_rank) {
        if *i < 2 {
            assert_eq!(*rank, 0, "prompt {i}: greedy tokens are the output's top-1");
        }
    }
    let layers = column_i64(&table, "layer");
    assert_eq!(table.height(), positions.height() * 31);
    assert_eq!((layers[0], layers[30]), (-1, 29));
    let kl = column_f64(&table, "kl_to_final");
    assert!(layers
        .iter()
        .zip(&kl)
        .all(|(&l, &k)| l != 29 || k.abs() < 1e-9));
    // "The capital of France is" → " Paris" forms by the last block.
    let crystal = column_opt_i64(&positions, "crystallization_layer");
    assert!(
        crystal[0].is_some_and(|l| (0..30).contains(&l)),
        "{crystal:?}"
    );
}
