//! The knockout plugin: every loss, ratio and synergy against direct engine
//! runs with the blocks left out, on a fixture; SmolLM2 on a few prompts.

use probe::forward::{text::TextCodec, Capture, Engine, EngineOptions, Request};
use probe::store::Checkpoint;

use crate::real_models::real_model;
use crate::util::{
    column_f64, column_i64, family_with_tokenizer, read_parquet, run_plugin_to, tempdir,
    DECODER_FIXTURES,
};

const PLUGIN: &str = "probe-plugin-knockout";

pub const SET: &str = r#"{"category": "facts", "prompt": "the cat sat on the", "completion": "mat . it was warm"}
{"category": "weather", "prompt": "the day was", "completion": "very hot and dry"}
{"category": "facts", "prompt": "is it", "completion": "yes"}
"#;

/// The token-weighted mean cross-entropy over the completions' tokens with
/// `blocks` run, computed from the engine's full logits.
pub fn direct_loss(engine: &mut Engine, sequences: &[(Vec<u32>, usize)], blocks: &[usize]) -> f64 {
    let (mut sum, mut n) = (0.0, 0usize);
    for (tokens, prompt_len) in sequences {
        let trace = engine
            .run(&Request {
                tokens,
                blocks: Some(blocks),
                capture: Capture {
                    logits: true,
                    ..Capture::default()
                },
                ..Request::default()
            })
            .unwrap();
        let losses = trace.token_losses().unwrap();
        // Position p predicts token p + 1: the completion's tokens.
        let scored = &losses[prompt_len - 1..tokens.len() - 1];
        sum += scored.iter().sum::<f64>();
        n += scored.len();
    }
    sum / n as f64
}

/// [`SET`]'s sequences (prompt, then completion without special tokens)
/// and their prompt lengths.
pub fn sequences(codec: &TextCodec) -> Vec<(Vec<u32>, usize)> {
    [
        ("the cat sat on the", "mat . it was warm"),
        ("the day was", "very hot and dry"),
        ("is it", "yes"),
    ]
    .iter()
    .map(|(prompt, completion)| {
        let mut tokens = codec.encode(prompt).unwrap();
        let prompt_len = tokens.len();
        tokens.extend(codec.encode_continuation(completion).unwrap());
        (tokens, prompt_len)
    })
    .collect()
}

#[test]
fn every_loss_and_synergy_matches_direct_runs_on_every_decoder_family() {
    for family in DECODER_FIXTURES {
        eprintln!("{family}");
        check_knockout(family);
    }
}

fn check_knockout(family: &str) {
    let dir = tempdir();
    let model = family_with_tokenizer(dir.path(), family);
    let set = dir.path().join("prompts.jsonl");
    std::fs::write(&set, SET).unwrap();
    let out = dir.path().join("knockout.parquet");
    run_plugin_to(
        PLUGIN,
        &model,
        &[&format!("prompts={}", set.display()), "pairs=true"],
        &out,
    );
    let table = read_parquet(&out);
    let pairs = read_parquet(&dir.path().join("knockout.pairs.parquet"));

    let checkpoint = Checkpoint::open(&model).unwrap();
    let codec = TextCodec::open(&checkpoint.dir).unwrap();
    let mut engine = Engine::open(&checkpoint, EngineOptions::default()).unwrap();
    let n = engine.num_blocks();
    let sequences = sequences(&codec);
    let all: Vec<usize> = (0..n).collect();
    let base = direct_loss(&mut engine, &sequences, &all);
    let without = |engine: &mut Engine, skipped: &[usize]| {
        let kept: Vec<usize> = all
            .iter()
            .copied()
            .filter(|b| !skipped.contains(b))
            .collect();
        direct_loss(engine, &sequences, &kept)
    };
    let close = |what: &str, got: f64, want: f64| {
        assert!(
            (got - want).abs() <= 1e-5 * want.abs().max(1.0),
            "{what}: plugin {got}, direct {want}"
        );
    };
    assert_eq!(
        column_i64(&table, "layer"),
        (0..n as i64).collect::<Vec<_>>()
    );
    let (loss, base_loss, delta, ratio) = (
        column_f64(&table, "loss"),
        column_f64(&table, "base_loss"),
        column_f64(&table, "delta"),
        column_f64(&table, "ratio"),
    );
    let mut single = Vec::new();
    for b in 0..n {
        let want = without(&mut engine, &[b]);
        close(&format!("block {b} loss"), loss[b], want);
        close("base loss", base_loss[b], base);
        close(&format!("block {b} delta"), delta[b], want - base);
        close(&format!("block {b} ratio"), ratio[b], want / base);
        single.push(want);
    }
    // Knocking a block out changes the loss: the test would see a no-op.
    assert!(
        single.iter().all(|l| (l - base).abs() > 1e-3),
        "{single:?} vs {base}"
    );
    let (i, j) = (column_i64(&pairs, "layer_i"), column_i64(&pairs, "layer_j"));
    let (pair_loss, synergy) = (column_f64(&pairs, "loss"), column_f64(&pairs, "synergy"));
    assert_eq!(pairs.height(), n * (n - 1) / 2);
    for r in 0..pairs.height() {
        let (a, b) = (i[r] as usize, j[r] as usize);
        assert!(a < b);
        let both = without(&mut engine, &[a, b]);
        close(&format!("pair {a},{b} loss"), pair_loss[r], both);
        let want = (both - base) - (single[a] - base) - (single[b] - base);
        close(&format!("pair {a},{b} synergy"), synergy[r], want);
    }
}

/// SmolLM2 on two prompts with given completions: block 0 is the most
/// critical (the published finding on Qwen3-4B), every ratio is finite and
/// above 1 for it.
#[test]
fn smollm2_block_zero_matters_most() {
    let Some(model) = real_model("SmolLM2-135M-Instruct") else {
        return;
    };
    let dir = tempdir();
    let set = crate::util::two_real_prompts(dir.path());
    let out = dir.path().join("knockout.parquet");
    run_plugin_to(
        PLUGIN,
        &model,
        &[&format!("prompts={}", set.display())],
        &out,
    );
    let table = read_parquet(&out);
    let ratio = column_f64(&table, "ratio");
    assert_eq!(ratio.len(), 30);
    assert!(ratio.iter().all(|r| r.is_finite() && *r > 0.0));
    let most = (0..30).fold(0, |m, b| if ratio[b] > ratio[m] { b } else { m });
    assert_eq!(most, 0, "{ratio:?}");
    assert!(ratio[0] > 2.0, "{}", ratio[0]);
}
