//! The patch plugin: every row's logit difference, effect and KL against
//! the patched run made here from the token ids up — the whole model with
//! the clean run's activation put in place by an engine edit, the logits of
//! the last position taken whole — for every component (heads included), in
//! both directions, on every decoder fixture family; bad pair files and
//! models refused; on SmolLM2, a one-token subject patched at the embedding
//! restores the clean answer exactly.

use probe::forward::{text::TextCodec, Capture, Edit, Engine, EngineOptions, Hook, Request};
use probe::store::Checkpoint;

use crate::real_models::real_model;
use crate::util::{
    column_f64, column_i64, column_str, family_with_tokenizer, read_parquet, run_plugin,
    run_plugin_to, tempdir, DECODER_FIXTURES,
};

const PLUGIN: &str = "probe-plugin-patch";

const PAIRS: &str = r#"{"clean": "the cat sat on the", "corrupt": "the day sat on the", "answer": "mat", "wrong": "cold", "category": "facts"}

{"clean": "it was very hot", "corrupt": "it was very cold", "answer": "day", "wrong": "sir"}
"#;

/// (z[answer] − z[wrong], softmax) at the last position of a logits array.
fn last_position(logits: &[f32], t: usize, answer: u32, wrong: u32) -> (f64, Vec<f64>) {
    let vocab = logits.len() / t;
    let row: Vec<f64> = logits[(t - 1) * vocab..]
        .iter()
        .map(|&v| f64::from(v))
        .collect();
    let max = row.iter().cloned().fold(f64::MIN, f64::max);
    let sum: f64 = row.iter().map(|v| (v - max).exp()).sum();
    let p = row.iter().map(|v| (v - max).exp() / sum).collect();
    (row[answer as usize] - row[wrong as usize], p)
}

fn kl(p: &[f64], q: &[f64]) -> f64 {
    p.iter()
        .zip(q)
        .filter(|(a, _)| **a > 0.0)
        .map(|(a, b)| a * (a / b).ln())
        .sum()
}

#[test]
fn every_effect_matches_the_patched_run_made_by_hand() {
    for family in DECODER_FIXTURES {
        for direction in ["denoise", "noise"] {
            if direction == "noise" && family != "llama-tied-f32" {
                continue;
            }
            eprintln!("{family} {direction}");
            check_patch(family, direction);
        }
    }
}

fn check_patch(family: &str, direction: &str) {
    let dir = tempdir();
    let model = family_with_tokenizer(dir.path(), family);
    let pairs = dir.path().join("pairs.jsonl");
    std::fs::write(&pairs, PAIRS).unwrap();
    let out = dir.path().join("patch.parquet");
    run_plugin_to(
        PLUGIN,
        &model,
        &[
            &format!("pairs={}", pairs.display()),
            "components=resid,attn,mlp,heads",
            &format!("direction={direction}"),
            "min_gap=0",
        ],
        &out,
    );
    let table = read_parquet(&out);
    let summary = read_parquet(&dir.path().join("patch.summary.parquet"));

    let checkpoint = Checkpoint::open(&model).unwrap();
    let codec = TextCodec::open(&checkpoint.dir).unwrap();
    let mut engine = Engine::open(&checkpoint, EngineOptions::default()).unwrap();
    let (n, d, heads, dh) = (
        engine.num_blocks(),
        engine.arch.hidden,
        engine.arch.heads,
        engine.arch.head_dim,
    );
    let texts = [
        (
            "the cat sat on the",
            "the day sat on the",
            "mat",
            "cold",
            0i64,
        ),
        ("it was very hot", "it was very cold", "day", "sir", 2),
    ];
    let (pair, component, layer, position, from_end) = (
        column_i64(&table, "pair"),
        column_str(&table, "component"),
        column_i64(&table, "layer"),
        column_i64(&table, "position"),
        column_i64(&table, "position_from_end"),
    );
    let head: Vec<Option<i64>> = table
        .column("head")
        .unwrap()
        .i64()
        .unwrap()
        .iter()
        .collect();
    let (ld, effect, kls) = (
        column_f64(&table, "ld"),
        column_f64(&table, "effect"),
        column_f64(&table, "kl"),
    );
    let mut expected_rows = 0;
    let mut moved = 0;
    for (clean_text, corrupt_text, answer, wrong, line) in texts {
        let clean = codec.encode(clean_text).unwrap();
        let corrupt = codec.encode(corrupt_text).unwrap();
        let answer = codec.encode_continuation(answer).unwrap()[0];
        let wrong = codec.encode_continuation(wrong).unwrap()[0];
        let t = clean.len();
        expected_rows += (3 + heads) * n * t;
        let everything = Capture {
            residuals: true,
            updates: true,
            z: true,
            logits: true,
            ..Capture::default()
        };
        let run = |engine: &mut Engine, tokens: &[u32], edits: &[Edit]| {
            engine
                .run(&Request {
                    tokens,
                    edits,
                    capture: everything,
                    ..Request::default()
                })
                .unwrap()
        };
        let clean_run = run(&mut engine, &clean, &[]);
        let corrupt_run = run(&mut engine, &corrupt, &[]);
        let (ld_clean, p_clean) =
            last_position(clean_run.logits.as_ref().unwrap(), t, answer, wrong);
        let (ld_corrupt, _) = last_position(corrupt_run.logits.as_ref().unwrap(), t, answer, wrong);
        let denoise = direction == "denoise";
        let (base_tokens, source) = if denoise {
            (&corrupt, &clean_run)
        } else {
            (&clean, &corrupt_run)
        };
        for r in (0..table.height()).filter(|&r| pair[r] == line) {
            let (l, p) = (layer[r] as usize, position[r] as usize);
            assert_eq!(from_end[r], (t - 1 - p) as i64);
            let rows = |v: &[f32], w: usize| v[p * w..(p + 1) * w].to_vec();
            let edit = match component[r].as_str() {
                "resid" => Edit::replace(l, p, rows(&source.residuals[l], d)),
                "attn" => Edit::replace(l, p, rows(&source.attn_updates[l], d)).at(Hook::AttnOut),
                "mlp" => Edit::replace(l, p, rows(&source.mlp_updates[l], d)).at(Hook::MlpOut),
                _ => {
                    let h = head[r].unwrap() as usize;
                    let start = p * heads * dh + h * dh;
                    Edit::replace(l, p, source.z[l][start..start + dh].to_vec())
                        .at(Hook::Z { head: h })
                }
            };
            let patched = run(&mut engine, base_tokens, &[edit]);
            let (want_ld, p_patched) =
                last_position(patched.logits.as_ref().unwrap(), t, answer, wrong);
            let want_effect = if denoise {
                (want_ld - ld_corrupt) / (ld_clean - ld_corrupt)
            } else {
                (ld_clean - want_ld) / (ld_clean - ld_corrupt)
            };
            let what = format!(
                "{family} pair {line} {} layer {l} position {p} head {:?}",
                component[r], head[r]
            );
            assert!(
                (ld[r] - want_ld).abs() < 2e-4 * want_ld.abs().max(1.0),
                "{what}: ld {} vs {want_ld}",
                ld[r]
            );
            assert!(
                (effect[r] - want_effect).abs() < 2e-3 * want_effect.abs().max(1.0),
                "{what}: effect {} vs {want_effect}",
                effect[r]
            );
            let want_kl = kl(&p_clean, &p_patched);
            assert!(
                (kls[r] - want_kl).abs() < 1e-4 * want_kl.max(1.0),
                "{what}: kl {} vs {want_kl}",
                kls[r]
            );
            moved += usize::from(effect[r] != 0.0);
        }
    }
    assert_eq!(table.height(), expected_rows, "{family}");
    assert!(
        moved > expected_rows / 4,
        "{family}: only {moved} patches moved anything"
    );
    // The summary's `all` rows average the two pairs.
    let all = column_str(&summary, "category")
        .iter()
        .filter(|c| *c == "all")
        .count();
    assert!(all > 0 && summary.height() > all, "{family}");
}

#[test]
fn bad_pairs_and_models_are_refused_naming_them() {
    let dir = tempdir();
    let model = family_with_tokenizer(dir.path(), "llama-tied-f32");
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        format!("pairs={}", path.display())
    };
    let uneven = write(
        "uneven.jsonl",
        "{\"clean\": \"the cat sat\", \"corrupt\": \"the cat sat on\", \"answer\": \"mat\", \"wrong\": \"day\"}\n",
    );
    run_plugin(PLUGIN, &model, &[&uneven], &[])
        .fails_with(&["uneven.jsonl: line 1", "same length"]);
    let same = write(
        "same.jsonl",
        "\n{\"clean\": \"the cat\", \"corrupt\": \"the day\", \"answer\": \"mat\", \"wrong\": \"mat\"}\n",
    );
    run_plugin(PLUGIN, &model, &[&same], &[]).fails_with(&["same.jsonl: line 2", "same token"]);
    let broken = write("broken.jsonl", "{\"clean\": \"the cat\"}\n");
    run_plugin(PLUGIN, &model, &[&broken], &[])
        .fails_with(&["broken.jsonl: line 1", "not a pair object"]);
    run_plugin(PLUGIN, &model, &["components=resid,ffn"], &[]).fails_with(&["`ffn` is not one of"]);
    let bert = family_with_tokenizer(dir.path(), "bert-f32");
    run_plugin(PLUGIN, &bert, &[], &[]).fails_with(&["causal model"]);
    // A gap nobody reaches: every pair left out, with one warning line.
    let pairs = write("pairs.jsonl", PAIRS);
    let out = dir.path().join("skip.parquet");
    let run = run_plugin(
        PLUGIN,
        &model,
        &[&pairs, "min_gap=1e9"],
        &["--out", out.to_str().unwrap()],
    );
    assert!(
        run.stderr.contains("2 of 2 pairs left out"),
        "{}",
        run.stderr
    );
    let skipped = read_parquet(&dir.path().join("skip.skipped.parquet"));
    assert_eq!(column_i64(&skipped, "pair"), [0, 2]);
}

/// SmolLM2: "France" and "Germany" are one token each, so patching the
/// residual entering block 0 at the subject makes the corrupted run the
/// clean one — effect 1 — while the positions before it do nothing.
#[test]
fn smollm2_a_patched_subject_embedding_restores_the_answer() {
    let Some(model) = real_model("SmolLM2-135M-Instruct") else {
        return;
    };
    let dir = tempdir();
    let pairs = dir.path().join("pairs.jsonl");
    std::fs::write(
        &pairs,
        "{\"clean\": \"The capital of France is the city of\", \"corrupt\": \"The capital of Germany is the city of\", \"answer\": \" Paris\", \"wrong\": \" Berlin\"}\n",
    )
    .unwrap();
    let out = run_plugin_to(
        PLUGIN,
        &model,
        &[
            &format!("pairs={}", pairs.display()),
            "components=resid",
            "layers=0,29",
        ],
        &dir.path().join("patch.parquet"),
    );
    let table = read_parquet(&out);
    let (layer, position, effect) = (
        column_i64(&table, "layer"),
        column_i64(&table, "position"),
        column_f64(&table, "effect"),
    );
    for r in 0..table.height() {
        if layer[r] == 0 && position[r] == 3 {
            assert!(
                (effect[r] - 1.0).abs() < 1e-4,
                "subject at block 0: {}",
                effect[r]
            );
        } else if position[r] < 3 {
            assert_eq!(effect[r], 0.0, "before the subject");
        }
    }
    // By the last block the answer has moved to the last position.
    let last = (0..table.height())
        .find(|&r| layer[r] == 29 && position[r] == 7)
        .unwrap();
    assert!(
        effect[last] > 0.5,
        "last block, last position: {}",
        effect[last]
    );
}
