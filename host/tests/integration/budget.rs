//! The weight cache under a memory budget: a model whose converted weights
//! do not fit streams through the budget — blocks loaded and dropped in
//! turn, a block larger than the budget run as its attention and then its
//! MLP, the embedding's rows gathered per run, the head in tiles — and gives
//! the numbers the unbudgeted engine gives, while the cache's own
//! accounting stays under the budget.

use std::path::Path;

use probe::forward::{Capture, Engine, EngineOptions, Request};
use probe::store::Checkpoint;
use probe::Dtype;

use crate::real_models::real_model;
use crate::util::{fixture, probe, tempdir};

/// The fixture's families, as BF16 copies (F16 stays F16): every tensor
/// is converted, so every one goes through the cache.
const FAMILIES: [&str; 6] = [
    "llama-tied-f32",
    "qwen2-untied-f16",
    "qwen3-tied-bf16",
    "gpt2-tied-f32",
    "gemma3-tied-f32",
    "bert-f32",
];

fn half_precision_copy(name: &str, dir: &Path) -> std::path::PathBuf {
    let source = Checkpoint::open(&fixture(name)).unwrap();
    let out = dir.join(name);
    let cast = (source.tensors()[0].dtype == Dtype::F32).then_some(Dtype::BF16);
    probe::convert::to_safetensors(&source, cast, &out).unwrap();
    out
}

fn open(checkpoint: &Checkpoint, budget: Option<usize>) -> Engine<'_> {
    Engine::open(
        checkpoint,
        EngineOptions {
            memory_budget: budget,
            ..EngineOptions::default()
        },
    )
    .unwrap()
}

/// f32 bytes of each block's tensors, and of the largest block.
fn largest_block_bytes(checkpoint: &Checkpoint) -> usize {
    let schema = probe::Schema::of(checkpoint);
    let mut per_block = std::collections::BTreeMap::<usize, usize>::new();
    for (entry, placement) in schema.placed(checkpoint) {
        if let Some(layer) = placement.layer {
            *per_block.entry(layer).or_default() += entry.numel() * 4;
        }
    }
    per_block.values().copied().max().unwrap()
}

fn assert_close(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let scale = want.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= 1e-5 * scale,
            "{what}[{i}]: {g} with a budget, {w} without"
        );
    }
}

#[test]
fn a_budget_smaller_than_one_block_gives_the_same_numbers() {
    let dir = tempdir();
    let tokens: Vec<u32> = vec![1, 17, 5, 17, 42, 3, 9];
    for family in FAMILIES {
        let path = half_precision_copy(family, dir.path());
        let checkpoint = Checkpoint::open(&path).unwrap();
        let block = largest_block_bytes(&checkpoint);
        // Four fifths of a block: each half (attention or MLP) fits, the
        // whole block does not.
        let budget = block * 4 / 5;
        let mut free = open(&checkpoint, None);
        let mut tight = open(&checkpoint, Some(budget));
        let capture = Capture {
            residuals: true,
            updates: true,
            attention: true,
            logits: free.has_head(),
            loss: free.has_head(),
            z: true,
        };
        let request = Request {
            tokens: &tokens,
            capture,
            ..Request::default()
        };
        let want = free.run(&request).unwrap();
        let got = tight.run(&request).unwrap();
        crate::forward::assert_same_trace(family, &got, &want, 1e-5);
        if let (Some(g), Some(w)) = (got.loss(), want.loss()) {
            assert!((g - w).abs() < 1e-5, "{family}: loss {g} vs {w}");
        }
        // Every block ran as two halves; the unbudgeted engine ran it whole.
        let blocks = free.num_blocks();
        assert_eq!(free.block_runs(), blocks, "{family}");
        assert_eq!(tight.block_runs(), 2 * blocks, "{family}");
        let stats = tight.weight_stats();
        assert!(
            stats.peak_converted_bytes <= budget && stats.peak_converted_bytes > 0,
            "{family}: peak {} over a budget of {budget}",
            stats.peak_converted_bytes
        );
        assert!(stats.evictions > 0, "{family}: nothing was dropped");
        assert!(
            free.weight_stats().peak_converted_bytes > budget,
            "{family}: the unbudgeted engine holds more than the budget"
        );

        if family != "bert-f32" {
            // Greedy generation steps through every block on its cached keys
            // and values: under the budget, as the attention step, then the MLP.
            let prompts: [&[u32]; 2] = [&tokens[..4], &tokens[..6]];
            let before = tight.block_runs();
            assert_eq!(
                tight.generate(&prompts, 5, &[]).unwrap(),
                free.generate(&prompts, 5, &[]).unwrap(),
                "{family}: greedy tokens"
            );
            assert!(
                tight.block_runs() - before > 2 * blocks,
                "{family}: no step ran"
            );
            assert!(tight.weight_stats().peak_converted_bytes <= budget);
        }
        if free.has_head() {
            // The logit lens and a restricted vocabulary take the same path
            // through the budget (the head tiled or its rows gathered).
            let lens_free = free.lens(&want.output, tokens.len()).unwrap();
            let lens_tight = tight.lens(&want.output, tokens.len()).unwrap();
            assert_close(&format!("{family} lens"), &lens_tight, &lens_free);
            let restricted = Request {
                tokens: &tokens,
                capture: Capture {
                    loss: true,
                    ..Capture::default()
                },
                loss_vocab: Some(&[0, 2, 4, 8]),
                ..Request::default()
            };
            let (g, w) = (
                tight.run(&restricted).unwrap().loss().unwrap(),
                free.run(&restricted).unwrap().loss().unwrap(),
            );
            assert!((g - w).abs() < 1e-5, "{family}: restricted loss {g} vs {w}");
            assert!(tight.weight_stats().peak_converted_bytes <= budget);
        }
    }
}

#[test]
fn the_head_runs_in_tiles_when_the_vocabulary_does_not_fit() {
    let dir = tempdir();
    let path = half_precision_copy("llama-tied-f32", dir.path());
    let checkpoint = Checkpoint::open(&path).unwrap();
    // The tied head is 96 × 32 (12 KiB as f32), the largest matrix 64 × 32
    // (8 KiB): a 10 kB budget opens the engine but holds under the whole
    // head, which therefore runs as two tiles.
    let budget = 10_000;
    let residual: Vec<f32> = (0..5 * 32)
        .map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.1)
        .collect();
    let want = open(&checkpoint, None).lens(&residual, 5).unwrap();
    let mut tight = open(&checkpoint, Some(budget));
    let got = tight.lens(&residual, 5).unwrap();
    assert_close("tiled logits", &got, &want);
    let stats = tight.weight_stats();
    assert!(stats.peak_converted_bytes <= budget, "{stats:?}");
    // Both tiles' rows were converted: the whole head, once.
    assert_eq!(
        stats.total_converted_bytes,
        96 * 32 * 4 + 32 * 4,
        "{stats:?}"
    );
    // A whole pass needs an attention half (12 KiB) at once: a clear error.
    let error = tight
        .run(&Request {
            tokens: &[1, 2],
            ..Request::default()
        })
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("the attention of block 0 needs 12.1 KiB of f32 weights at once"),
        "{error}"
    );
}

#[test]
fn a_budget_too_small_for_one_tensor_is_a_clear_error() {
    let dir = tempdir();
    let path = half_precision_copy("llama-tied-f32", dir.path());
    let run = probe([
        "forward".as_ref(),
        path.as_os_str(),
        "--tokens".as_ref(),
        "1,2,3".as_ref(),
        "--memory-budget".as_ref(),
        "1KB".as_ref(),
    ]);
    // The fixture's largest matrices are 64 × 32 (8 KiB as f32).
    run.fails_with(&[
        path.to_str().unwrap(),
        "needs 8.0 KiB of f32 weights at once, more than the memory budget of 1000 B (--memory-budget)",
    ]);
    let run = probe([
        "forward".as_ref(),
        path.as_os_str(),
        "--tokens".as_ref(),
        "1".as_ref(),
        "--memory-budget".as_ref(),
        "lots".as_ref(),
    ]);
    assert_eq!(run.code, Some(2), "{}", run.stderr);
    assert!(
        run.stderr.contains("`lots` is not a size"),
        "{}",
        run.stderr
    );
}

/// `probe forward -f json` on `model` with these extra arguments.
fn forward_json(model: &Path, extra: &[&str]) -> serde_json::Value {
    let mut args = vec![
        "forward".to_string(),
        model.display().to_string(),
        "--text".into(),
        "The capital of France is Paris, and the capital of Italy is".into(),
        "-f".into(),
        "json".into(),
    ];
    args.extend(extra.iter().map(|a| a.to_string()));
    let out = probe(&args).ok();
    serde_json::from_str(&out).unwrap()
}

#[test]
fn smollm2_in_bf16_streams_through_64_mb_with_the_same_predictions() {
    let Some(model) = real_model("SmolLM2-135M-Instruct") else {
        return;
    };
    let dir = tempdir();
    let bf16 = dir.path().join("bf16");
    probe([
        "convert".as_ref(),
        model.as_os_str(),
        "--dtype".as_ref(),
        "bf16".as_ref(),
        "--out".as_ref(),
        bf16.as_os_str(),
    ])
    .ok();
    let free = forward_json(&bf16, &["--memory-budget", "none"]);
    let tight = forward_json(&bf16, &["--memory-budget", "64MB"]);
    let loss = |json: &serde_json::Value| json["loss"].as_f64().unwrap();
    assert!(
        (loss(&tight) - loss(&free)).abs() < 1e-5,
        "loss {} with 64 MB, {} without",
        loss(&tight),
        loss(&free)
    );
    let top1 = |json: &serde_json::Value| -> Vec<u64> {
        json["positions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["top"][0]["id"].as_u64().unwrap())
            .collect()
    };
    assert_eq!(top1(&tight), top1(&free));
    // BF16 rounding moves the loss a little from the F32 model's, no more.
    let f32_loss = loss(&forward_json(&model, &[]));
    assert!(
        (loss(&free) - f32_loss).abs() < 0.05,
        "{} vs {f32_loss}",
        loss(&free)
    );
    // The cache's own accounting: under 64 MB with the budget; without it,
    // every converted tensor (the blocks and the 113 MB head; the embedding
    // table is read by rows) stays.
    let weights = |json: &serde_json::Value, key: &str| json["weights"][key].as_u64().unwrap();
    assert_eq!(weights(&tight, "budget_bytes"), 64_000_000);
    assert!(weights(&tight, "peak_converted_bytes") <= 64_000_000);
    assert!(weights(&tight, "evictions") > 0);
    assert!(free["weights"]["budget_bytes"].is_null());
    let free_peak = weights(&free, "peak_converted_bytes");
    assert!(
        (500_000_000..560_000_000).contains(&free_peak),
        "{free_peak}"
    );
    assert_eq!(weights(&free, "evictions"), 0);
}

#[test]
fn plugin_runs_record_the_budget_and_the_cache_counters() {
    let dir = tempdir();
    let with_words = crate::util::family_with_tokenizer(dir.path(), "llama-tied-f32");
    let source = Checkpoint::open(&with_words).unwrap();
    let path = dir.path().join("bf16");
    probe::convert::to_safetensors(&source, Some(Dtype::BF16), &path).unwrap();
    let set = dir.path().join("prompts.jsonl");
    std::fs::write(&set, crate::knockout::SET).unwrap();
    let out = dir.path().join("knockout.parquet");
    let plugin = crate::util::plugin_lib("probe-plugin-knockout");
    crate::util::run_plugin(
        plugin.to_str().unwrap(),
        &path,
        &[&format!("prompts={}", set.display())],
        &[
            "--memory-budget",
            "40KB",
            "--out",
            out.to_str().unwrap(),
            "--quiet",
        ],
    )
    .ok();
    let (_, metadata) = probe::run::read_parquet(&out).unwrap();
    let value = |key: &str| {
        metadata
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| panic!("no {key} in {metadata:?}"))
    };
    assert_eq!(value("probe.memory_budget"), "40000");
    let weights: serde_json::Value = serde_json::from_str(&value("probe.weights")).unwrap();
    let stats = &weights["bf16"];
    assert_eq!(stats["budget_bytes"], 40000, "{weights}");
    let peak = stats["peak_converted_bytes"].as_u64().unwrap();
    assert!(peak > 0 && peak <= 40000, "{peak}");
}
