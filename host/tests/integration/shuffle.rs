//! `probe shuffle`: blocks permuted by renaming, the permutation in the
//! metadata, and the model still the same model when its blocks are run in
//! the true order.

use probe::forward::{Capture, Engine, EngineOptions, Request};
use probe::store::Checkpoint;

use std::path::Path;

use crate::real_models::real_model;
use crate::util::{column_i64, fixture, probe, tempdir};

#[test]
fn shuffled_blocks_run_in_their_true_order_give_the_original_model() {
    for name in [
        "llama-sharded-f16",
        "gemma3-tied-f32",
        "gpt2-tied-f32",
        "bert-f32",
        "qwen2-untied-f16",
    ] {
        let dir = tempdir();
        let out = dir.path().join("shuffled");
        probe([
            "shuffle".as_ref(),
            fixture(name).as_os_str(),
            "--seed".as_ref(),
            "11".as_ref(),
            "--out".as_ref(),
            out.as_os_str(),
        ])
        .ok();
        let original = Checkpoint::open(&fixture(name)).unwrap();
        let shuffled = Checkpoint::open(&out).unwrap();
        let metadata = shuffled.user_metadata();
        let truth: Vec<usize> =
            serde_json::from_str(&metadata[probe::shuffle::TRUE_POSITION_KEY]).unwrap();
        let n = truth.len();
        assert_eq!(truth, probe::shuffle::permutation(n, 11), "{name}");
        assert_ne!(
            truth,
            (0..n).collect::<Vec<_>>(),
            "{name}: a shuffle moves something"
        );
        assert_eq!(original.tensors().len(), shuffled.tensors().len());

        // The stored block holding true depth k, for every k.
        let mut order = vec![0; n];
        for (stored, &depth) in truth.iter().enumerate() {
            order[depth] = stored;
        }
        let tokens = [3u32, 14, 15, 92, 65];
        let capture = Capture {
            logits: name != "bert-f32",
            ..Capture::default()
        };
        let mut a = Engine::open(&original, EngineOptions::default()).unwrap();
        let mut b = Engine::open(&shuffled, EngineOptions::default()).unwrap();
        let base = a
            .run(&Request {
                tokens: &tokens,
                capture,
                ..Request::default()
            })
            .unwrap();
        let repaired = b
            .run(&Request {
                tokens: &tokens,
                blocks: Some(&order),
                capture,
                ..Request::default()
            })
            .unwrap();
        assert_eq!(base.output, repaired.output, "{name}");
        let as_stored = b
            .run(&Request {
                tokens: &tokens,
                capture,
                ..Request::default()
            })
            .unwrap();
        assert_ne!(
            base.output, as_stored.output,
            "{name}: the shuffled order is another model"
        );
    }
    probe([
        "shuffle".as_ref(),
        fixture("paramgolf-banked-bf16").as_os_str(),
        "--seed".as_ref(),
        "1".as_ref(),
        "--out".as_ref(),
        tempdir().path().as_os_str(),
    ])
    .fails_with(&[
        "paramgolf-banked-bf16",
        "banked checkpoints cannot be shuffled yet",
    ]);
}

/// Every method of the plugin; the slow loss searches run on a fixture only.
const METHODS: [&str; 11] = [
    "norm_gain",
    "weight_stats",
    "cosine",
    "svd_spectrum",
    "fiedler",
    "ensemble_rank",
    "flow",
    "flow_random",
    "loss_bubble",
    "flow_insert",
    "flow_repair",
];

/// The shuffle plugin (a real cdylib) reads the recorded permutation and
/// scores each method; the scores are recomputed here from its own rows.
#[test]
fn the_shuffle_plugin_scores_its_methods_against_the_recorded_truth() {
    let dir = tempdir();
    let shuffled = dir.path().join("shuffled");
    probe([
        "shuffle".as_ref(),
        fixture("llama-sharded-f16").as_os_str(),
        "--seed".as_ref(),
        "5".as_ref(),
        "--out".as_ref(),
        shuffled.as_os_str(),
    ])
    .ok();
    let out = dir.path().join("order.parquet");
    crate::util::run_plugin_to(
        "probe-plugin-shuffle",
        &shuffled,
        &[&format!("methods={}", METHODS.join(","))],
        &out,
    );
    let rows = crate::util::read_parquet(&out);
    let methods = crate::util::read_parquet(&dir.path().join("order.methods.parquet"));
    assert_eq!(rows.height(), METHODS.len() * 4, "methods × 4 blocks");
    let truth = probe::shuffle::permutation(4, 5);
    let column = |name: &str| column_i64(&rows, name);
    let (stored, recovered, true_position) = (
        column("stored_index"),
        column("recovered_position"),
        column("true_position"),
    );
    for (m, name) in METHODS.iter().enumerate() {
        let range = m * 4..(m + 1) * 4;
        assert_eq!(
            rows.column("method")
                .unwrap()
                .get(range.start)
                .unwrap()
                .get_str(),
            Some(*name)
        );
        let mut recovered_of = vec![0usize; 4];
        for i in range {
            assert_eq!(true_position[i] as usize, truth[stored[i] as usize]);
            recovered_of[stored[i] as usize] = recovered[i] as usize;
        }
        let mut sorted = recovered_of.clone();
        sorted.sort();
        assert_eq!(sorted, vec![0, 1, 2, 3], "{name}: a permutation");
        let right = recovered_of
            .iter()
            .zip(&truth)
            .filter(|(a, b)| a == b)
            .count() as f64
            / 4.0;
        let pairs: f64 = (0..4)
            .flat_map(|i| (i + 1..4).map(move |j| (i, j)))
            .map(|(i, j)| {
                let a = (recovered_of[i] as f64 - recovered_of[j] as f64).signum();
                let b = (truth[i] as f64 - truth[j] as f64).signum();
                a * b
            })
            .sum();
        let get = |col: &str| methods.column(col).unwrap().f64().unwrap().get(m).unwrap();
        assert_eq!(get("accuracy"), right, "{name}");
        assert!((get("kendall_tau") - pairs / 6.0).abs() < 1e-12, "{name}");
    }
}

/// Generated checkpoints of every family the engine runs, with a planted
/// depth trend (block i writes updates scaled by 1.5^i: random weights
/// carry no order of their own), 6 blocks, each shuffled with 20 seeds: the
/// default pipeline restores every one. Their loss is no better than chance,
/// so the pipeline rests on `flow` alone here.
#[test]
fn the_default_pipeline_restores_trended_fixtures_of_every_family() {
    for name in [
        "llama-tied-f32",
        "qwen2-untied-f16",
        "qwen3-tied-bf16",
        "gemma3-tied-f32",
        "gpt2-tied-f32",
        "bert-f32",
    ] {
        let dir = tempdir();
        let spec = probe_fixtures::Spec {
            layers: 6,
            depth_trend: 1.5,
            ..probe_fixtures::by_name(name).unwrap()
        };
        probe_fixtures::write(&spec, dir.path()).unwrap();
        for seed in 1..=20 {
            let r = recover_with(dir.path(), seed, "moved");
            assert_eq!(r.recovered, r.truth, "{name}, seed {seed}");
            // A loss at chance (or none, for BERT) cannot make a place sure.
            assert!(
                r.sure.iter().all(|s| *s != Some(true)),
                "{name}, seed {seed}"
            );
        }
    }
}

/// `write=DIR` writes the checkpoint in the recovered order: every tensor
/// is byte for byte the original's of the same name, the per-block config
/// entries are back, and no shuffle is recorded any more.
#[test]
fn the_repaired_checkpoint_is_the_original() {
    let dir = tempdir();
    let original = dir.path().join("original");
    let spec = probe_fixtures::Spec {
        layers: 6,
        depth_trend: 1.5,
        ..probe_fixtures::by_name("gemma3-tied-f32").unwrap()
    };
    probe_fixtures::write(&spec, &original).unwrap();
    let shuffled = dir.path().join("shuffled");
    probe([
        "shuffle".as_ref(),
        original.as_os_str(),
        "--seed".as_ref(),
        "4".as_ref(),
        "--out".as_ref(),
        shuffled.as_os_str(),
    ])
    .ok();
    let repaired = dir.path().join("repaired");
    let write = format!("write={}", repaired.display());
    crate::util::run_plugin_to(
        "probe-plugin-shuffle",
        &shuffled,
        &[&write],
        &dir.path().join("order.parquet"),
    );
    let (a, b) = (
        Checkpoint::open(&original).unwrap(),
        Checkpoint::open(&repaired).unwrap(),
    );
    assert_eq!(a.tensors().len(), b.tensors().len());
    for entry in a.tensors() {
        let other = b
            .tensors()
            .iter()
            .find(|e| e.name == entry.name)
            .unwrap_or_else(|| panic!("{} is missing", entry.name));
        assert!(a.view(entry).bytes == b.view(other).bytes, "{}", entry.name);
    }
    let metadata = b.user_metadata();
    assert!(!metadata.contains_key(probe::shuffle::TRUE_POSITION_KEY));
    assert_eq!(metadata["probe.shuffle.repaired_by"], "flow_repair");
    assert_eq!(a.config, b.config, "gemma3's layer_types are back in order");
}

/// What the default pipeline said of a shuffled checkpoint, per stored block.
struct Recovered {
    recovered: Vec<i64>,
    truth: Vec<i64>,
    /// The measured margin (null where nothing was measured).
    confidence: Vec<Option<f64>>,
    /// Whether the block's place is sure (null where not judged).
    sure: Vec<Option<bool>>,
    /// The margin on the prompts, which the search never saw (null where
    /// not measured).
    held_out: Vec<Option<f64>>,
}

/// Shuffle `model` with `seed` (per-block config moved with the blocks, or
/// kept as it was), run the plugin's default pipeline and read its table.
fn recover_with(model: &Path, seed: u64, config: &str) -> Recovered {
    recover_with_params(model, seed, config, &[])
}

/// [`recover_with`], the plugin run with `params`.
fn recover_with_params(model: &Path, seed: u64, config: &str, params: &[&str]) -> Recovered {
    let dir = tempdir();
    let shuffled = dir.path().join("shuffled");
    probe([
        "shuffle".as_ref(),
        model.as_os_str(),
        "--seed".as_ref(),
        seed.to_string().as_ref(),
        "--config".as_ref(),
        config.as_ref(),
        "--out".as_ref(),
        shuffled.as_os_str(),
    ])
    .ok();
    let out = dir.path().join("order.parquet");
    crate::util::run_plugin_to("probe-plugin-shuffle", &shuffled, params, &out);
    let rows = crate::util::read_parquet(&out);
    Recovered {
        recovered: column_i64(&rows, "recovered_position"),
        truth: column_i64(&rows, "true_position"),
        confidence: rows
            .column("confidence")
            .unwrap()
            .f64()
            .unwrap()
            .iter()
            .collect(),
        sure: rows
            .column("sure")
            .unwrap()
            .bool()
            .unwrap()
            .iter()
            .collect(),
        held_out: rows
            .column("held_out_margin")
            .unwrap()
            .f64()
            .unwrap()
            .iter()
            .collect(),
    }
}

/// [`recover_with`], the config moved with the blocks: (recovered
/// position, true position) per stored block.
fn recover(model: &Path, seed: u64) -> (Vec<i64>, Vec<i64>) {
    let r = recover_with(model, seed, "moved");
    (r.recovered, r.truth)
}

/// Every block recovered, and every one sure: a margin of at least 1 % on
/// the repair text, and no swap the prompts prefer by 1 % or more.
fn assert_exact_and_sure(r: &Recovered, what: &str) {
    assert_eq!(r.recovered, r.truth, "{what}");
    for (b, (confidence, sure)) in r.confidence.iter().zip(&r.sure).enumerate() {
        assert_eq!(*sure, Some(true), "{what}: block {b} ({confidence:?})");
        assert!(confidence.is_some_and(|c| c >= 0.01), "{what}: block {b}");
        assert!(
            r.held_out[b].is_some_and(|m| m > -0.01),
            "{what}: block {b}"
        );
    }
}

/// MiniLM (6 blocks, post-norm, no language-model head): the default
/// pipeline is `flow` alone there, and it is exact for every seed.
#[test]
fn the_default_pipeline_restores_minilm_for_20_seeds() {
    let Some(model) = real_model("all-MiniLM-L6-v2") else {
        return;
    };
    for seed in 1..=20 {
        let (recovered, truth) = recover(&model, seed);
        assert_eq!(recovered, truth, "seed {seed}");
    }
}

/// SmolLM2 (30 blocks): `flow` alone misplaces nine; the loss-checked
/// repair puts every one back. The pipeline never reads stored indices, so
/// its answer in true positions should not depend on the seed; two seeds
/// check that here (the fixtures and MiniLM above take 20 each), and the
/// 20-seed SmolLM2 sweep is `cargo xtask bench shuffle` — 15 s a seed in a
/// debug build is a benchmark's cost, not a test's.
#[test]
fn the_default_pipeline_restores_smollm2_for_two_seeds() {
    let Some(model) = real_model("SmolLM2-135M-Instruct") else {
        return;
    };
    for seed in [3, 17] {
        assert_exact_and_sure(
            &recover_with(&model, seed, "moved"),
            &format!("seed {seed}"),
        );
    }
}

/// A repair text too short to judge an order (4 tokens of it) leads the
/// search to a wrong chain that every swap makes worse *on that text*: on
/// SmolLM2 ten blocks end misplaced, eight of them with a margin over 1 %
/// there. The prompts, which the search never saw, prefer a swap by more
/// than 1 %, so no block is sure: the failure Qwen2.5-Coder 1.5B shows at
/// the default length, made on a model CI has.
#[test]
fn a_chain_the_prompts_disagree_with_is_not_sure() {
    let Some(model) = real_model("SmolLM2-135M-Instruct") else {
        return;
    };
    let r = recover_with_params(&model, 3, "moved", &["repair_tokens=4"]);
    let misplaced = (0..r.truth.len())
        .filter(|&b| r.recovered[b] != r.truth[b])
        .count();
    assert!(misplaced > 0, "4 tokens still found the true order");
    let misled = (0..r.truth.len())
        .filter(|&b| r.recovered[b] != r.truth[b] && r.confidence[b].is_some_and(|c| c >= 0.01))
        .count();
    assert!(
        misled > 0,
        "no misplaced block has a margin on the repair text"
    );
    assert!(
        r.held_out.iter().any(|m| m.is_some_and(|m| m <= -0.01)),
        "the prompts prefer no swap: {:?}",
        r.held_out
    );
    assert!(r.sure.iter().all(|s| *s == Some(false)), "{:?}", r.sure);
}

/// Gemma 3 270M, a model the pipeline was not developed on (sandwich norms,
/// massive activations, a 262 k vocabulary, sliding and global attention):
/// `flow` alone places about a third of its 18 blocks and its chain's loss
/// is worse than chance; the repair's wide pass puts every block back. One
/// seed with the per-block config moved with the blocks, one with it kept
/// (it then describes positions, as after renaming tensors); the 20-seed
/// sweeps of both are in the shuffle README.
#[test]
fn the_default_pipeline_restores_gemma3_in_both_config_forms() {
    let Some(dir) = real_model("gemma-3-270m-gguf") else {
        return;
    };
    let model = dir.join("gemma-3-270m-q4_k_m.gguf");
    assert_exact_and_sure(&recover_with(&model, 7, "moved"), "config moved, seed 7");
    assert_exact_and_sure(&recover_with(&model, 12, "kept"), "config kept, seed 12");
}

/// The config's two readings, forced on a config that `auto` reads as
/// positions only (it repeats Gemma 3's period): kept as it was, seed 7.
/// The first reading (blocks) is the wrong one there, and the repair of its
/// chain under the other reading ends with six blocks wrong, five of them
/// sure of their place on their own; the fallback, that reading from a
/// `flow` of its own, is what restores the order.
#[test]
fn both_readings_of_gemma3s_kept_config_restore_it() {
    let Some(dir) = real_model("gemma-3-270m-gguf") else {
        return;
    };
    let model = dir.join("gemma-3-270m-q4_k_m.gguf");
    let r = recover_with_params(&model, 7, "kept", &["config_reading=both"]);
    assert_exact_and_sure(&r, "config kept, both readings, seed 7");
}

/// A shuffle that moved the config's entries with their blocks and left
/// them repeating Gemma 3's period shifted (seed 106: the global blocks
/// listed at 0, 6, 12; they are 5, 11, 17): `auto` reads such a list as
/// describing positions, that reading leaves the loss at chance, and the
/// other reading, tried then, restores the order.
#[test]
fn a_shuffle_that_leaves_gemma3s_period_shifted_is_restored() {
    let Some(dir) = real_model("gemma-3-270m-gguf") else {
        return;
    };
    let model = dir.join("gemma-3-270m-q4_k_m.gguf");
    assert_exact_and_sure(
        &recover_with(&model, 106, "moved"),
        "config moved, seed 106",
    );
}
