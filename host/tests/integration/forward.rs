//! The forward engine against implementations this project did not write:
//! llama.cpp on SmolLM2, the published sentence-transformers similarity on
//! MiniLM, and an independent numpy forward of every fixture family.

use std::path::Path;

use probe::forward::{text::TextCodec, Capture, Edit, Engine, EngineOptions, Request, Trace};
use probe::store::Checkpoint;
use probe::Schema;
use probe_contract::{Branches, Hook, Sublayer};
use serde_json::Value;

use crate::real_models::real_model;
use crate::util::{fixture, probe};

fn reference(name: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fixtures/reference")
        .join(name);
    serde_json::from_slice(&std::fs::read(&path).expect("committed reference")).expect("valid JSON")
}

/// One fixture of every family the engine runs: llama, qwen2 (biases,
/// f16), qwen3 (q/k norms, bf16), GPT-2 (learned positions, Conv1D),
/// Gemma 3 (sandwich norms, sliding window) and BERT (bidirectional).
const ONE_OF_EACH_FAMILY: [&str; 6] = [
    "llama-tied-f32",
    "qwen2-untied-f16",
    "qwen3-tied-bf16",
    "gpt2-tied-f32",
    "gemma3-tied-f32",
    "bert-f32",
];

fn everything() -> Capture {
    Capture {
        residuals: true,
        updates: true,
        attention: true,
        logits: true,
        loss: true,
        z: true,
    }
}

fn run(engine: &mut Engine, tokens: &[u32], capture: Capture) -> Trace {
    engine
        .run(&Request {
            tokens,
            capture,
            ..Request::default()
        })
        .expect("forward pass")
}

fn as_f64s(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

fn norms(matrix: &[f32], hidden: usize) -> Vec<f64> {
    matrix
        .chunks_exact(hidden)
        .map(|r| r.iter().map(|&v| (v as f64).powi(2)).sum::<f64>().sqrt())
        .collect()
}

#[test]
fn every_family_matches_the_numpy_reference() {
    let reference = reference("fixtures_forward.json");
    let fixtures = reference["fixtures"].as_object().unwrap();
    assert_eq!(
        fixtures.len(),
        8,
        "llama ×3, qwen2, qwen3, gemma3, gpt2, bert"
    );
    for (name, expected) in fixtures {
        check_against_numpy(&reference, name, &fixture(name), expected);
    }
}

/// The same fixtures written as GGUF files by the `gguf` Python package the
/// way llama.cpp's converter writes them (permuted Q/K rows for llama,
/// Gemma's norms as `w + 1`, GPT-2's matrices transposed): read back, they
/// run as their safetensors do.
#[test]
fn every_family_as_gguf_matches_the_numpy_reference() {
    let reference = reference("fixtures_forward.json");
    for name in ONE_OF_EACH_FAMILY {
        let gguf = crate::gguf::gguf_fixture(&format!("{name}.gguf"));
        check_against_numpy(&reference, name, &gguf, &reference["fixtures"][name]);
    }
}

/// Residual norms at every stage and the logits (BERT: the last hidden
/// states) of the checkpoint at `path` against the numpy reference of `name`.
fn check_against_numpy(reference: &Value, name: &str, path: &Path, expected: &Value) {
    let tokens: Vec<u32> = as_f64s(&reference["tokens"])
        .iter()
        .map(|&t| t as u32)
        .collect();
    let checkpoint = Checkpoint::open(path).unwrap();
    let mut engine = Engine::open(&checkpoint, EngineOptions::default()).unwrap();
    let bert = name.starts_with("bert");
    let capture = Capture {
        residuals: true,
        logits: !bert,
        ..Capture::default()
    };
    let trace = run(&mut engine, &tokens, capture);
    let stages = expected["residual_norms"].as_array().unwrap();
    assert_eq!(trace.residuals.len(), stages.len(), "{name}: stages");
    for (stage, (ours, theirs)) in trace.residuals.iter().zip(stages).enumerate() {
        for (a, b) in norms(ours, trace.hidden).iter().zip(as_f64s(theirs)) {
            assert!(
                (a - b).abs() < 1e-4 * b.max(1.0),
                "{name} stage {stage}: norm {a} vs numpy {b}"
            );
        }
    }
    let (ours, theirs, width) = if bert {
        (&trace.output, &expected["hidden"], trace.hidden)
    } else {
        (
            trace.logits.as_ref().unwrap(),
            &expected["logits"],
            trace.vocab,
        )
    };
    let rows = theirs.as_array().unwrap();
    assert_eq!(rows.len(), tokens.len());
    for (p, row) in rows.iter().enumerate() {
        for (i, b) in as_f64s(row).into_iter().enumerate() {
            let a = ours[p * width + i] as f64;
            assert!(
                (a - b).abs() < 1e-4,
                "{} {name} position {p} index {i}: {a} vs numpy {b}",
                path.display()
            );
        }
    }
}

#[test]
fn smollm2_agrees_with_llama_cpp() {
    let Some(model) = real_model("SmolLM2-135M-Instruct") else {
        return;
    };
    let reference = reference("smollm2_llama_cpp.json");
    let checkpoint = Checkpoint::open(&model).unwrap();
    let codec = TextCodec::open(&checkpoint.dir).unwrap();
    let mut engine = Engine::open(&checkpoint, EngineOptions::default()).unwrap();
    let (mut agree, mut positions) = (0usize, 0usize);
    for text in reference["texts"].as_array().unwrap() {
        let tokens: Vec<u32> = as_f64s(&text["tokens"]).iter().map(|&t| t as u32).collect();
        // The re-created tokenizer.json splits text exactly as llama.cpp does.
        assert_eq!(
            codec.encode(text["text"].as_str().unwrap()).unwrap(),
            tokens,
            "tokenization"
        );
        let trace = run(
            &mut engine,
            &tokens,
            Capture {
                logits: true,
                ..Capture::default()
            },
        );
        let logits = trace.logits.as_ref().unwrap();
        for (p, expected) in text["positions"].as_array().unwrap().iter().enumerate() {
            let row = &logits[p * trace.vocab..(p + 1) * trace.vocab];
            let top = probe::forward::summary::top_k(row, 1)[0].0;
            agree += (top as u64 == expected["top_ids"][0].as_u64().unwrap()) as usize;
            positions += 1;
        }
        let ours = trace.loss().unwrap().exp();
        let theirs = text["perplexity"].as_f64().unwrap();
        assert!(
            (ours / theirs - 1.0).abs() < 0.02,
            "perplexity {ours} vs llama.cpp {theirs}"
        );
    }
    // --chat: the template's special tokens are single ids, not spelled out.
    let chat = codec.encode_chat("What is 2+2?").unwrap();
    assert_eq!(&chat[..3], &[1, 9690, 198], "<|im_start|> system \\n");
    let rendered = codec
        .render_chat(
            &std::fs::read_to_string(checkpoint.dir.join("tokenizer_config.json"))
                .map(|t| {
                    serde_json::from_str::<Value>(&t).unwrap()["chat_template"]
                        .as_str()
                        .unwrap()
                        .to_string()
                })
                .unwrap(),
            "What is 2+2?",
        )
        .unwrap();
    assert!(
        rendered.ends_with("<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"),
        "{rendered}"
    );
    assert_eq!(codec.encode(&rendered).unwrap(), chat);
    let share = agree as f64 / positions as f64;
    assert!(share >= 0.98, "top-1 agreement {agree}/{positions}");
}

#[test]
fn minilm_sentence_similarity_is_the_published_one() {
    let Some(model) = real_model("all-MiniLM-L6-v2") else {
        return;
    };
    let embed = |text: &str| -> Vec<f64> {
        let out = probe([
            "forward".as_ref(),
            model.as_os_str(),
            "--text".as_ref(),
            text.as_ref(),
            "--format".as_ref(),
            "json".as_ref(),
        ])
        .ok();
        let json: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(
            json["loss"],
            Value::Null,
            "an encoder has no next-token loss"
        );
        as_f64s(&json["mean_pooled"])
    };
    let a = embed("A man is eating food.");
    let b = embed("A man is eating a piece of bread.");
    let cosine: f64 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
    assert!((cosine - 0.755).abs() <= 0.005, "cosine {cosine}");
}

#[test]
fn interventions_reorder_skip_and_edit_the_residual() {
    let checkpoint = Checkpoint::open(&fixture("llama-tied-f32")).unwrap();
    let mut engine = Engine::open(&checkpoint, EngineOptions::default()).unwrap();
    assert_eq!(
        engine.num_block_graphs(),
        1,
        "identical blocks share one session"
    );
    let tokens = [3u32, 14, 15, 92, 65, 35];
    let base = run(&mut engine, &tokens, everything());
    let (t, d, h) = (tokens.len(), base.hidden, base.heads);

    // The logit lens on the last residual is the model's own output.
    let lens = engine.lens(&base.output, t).unwrap();
    assert_eq!(&lens, base.logits.as_ref().unwrap());
    assert_eq!(base.residuals.last().unwrap(), &base.output);

    // Each block adds its attention and MLP updates to the residual.
    for b in 0..base.blocks.len() {
        for i in 0..t * d {
            let sum = base.residuals[b][i] + base.attn_updates[b][i] + base.mlp_updates[b][i];
            assert!((sum - base.residuals[b + 1][i]).abs() < 1e-5);
        }
    }

    // Attention rows are distributions over earlier positions only.
    for probs in &base.attention {
        assert_eq!(probs.len(), h * t * t);
        for head in 0..h {
            for i in 0..t {
                let row = &probs[(head * t + i) * t..(head * t + i + 1) * t];
                assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5);
                assert!(row[i + 1..].iter().all(|&p| p == 0.0), "causal");
            }
        }
    }

    // No blocks: the output is the embedding.
    let none = engine
        .run(&Request {
            tokens: &tokens,
            blocks: Some(&[]),
            ..Request::default()
        })
        .unwrap();
    assert_eq!(none.output, base.residuals[0]);

    // Blocks 0 and 1 only: the residual after them is the base run's stage 2;
    // block 2 run twice differs from the base.
    let partial = engine
        .run(&Request {
            tokens: &tokens,
            blocks: Some(&[0, 1]),
            ..Request::default()
        })
        .unwrap();
    assert_eq!(partial.output, base.residuals[2]);
    let doubled = engine
        .run(&Request {
            tokens: &tokens,
            blocks: Some(&[0, 1, 2, 2]),
            ..Request::default()
        })
        .unwrap();
    assert_ne!(doubled.output, base.output);

    // Starting from the residual after block 1 and running block 2 alone
    // is the rest of the base run: a caller may cache a prefix.
    let resumed = engine
        .run(&Request {
            tokens: &tokens,
            blocks: Some(&[2]),
            start: Some(&base.residuals[2]),
            capture: Capture {
                logits: true,
                ..Capture::default()
            },
            ..Request::default()
        })
        .unwrap();
    assert_eq!(resumed.output, base.output);
    assert_eq!(resumed.loss(), base.loss());
    let wrong_shape = engine.run(&Request {
        tokens: &tokens,
        start: Some(&base.residuals[2][..d]),
        ..Request::default()
    });
    assert!(wrong_shape.is_err(), "a start residual of the wrong size");

    // Replacing the residual at position 3 after block 0 leaves the earlier
    // positions alone (causal) and changes position 3 onwards.
    let edit = [Edit::replace(1, 3, vec![0.5; d])];
    let edited = engine
        .run(&Request {
            tokens: &tokens,
            edits: &edit,
            capture: everything(),
            ..Request::default()
        })
        .unwrap();
    assert_eq!(&edited.residuals[1][3 * d..4 * d], &vec![0.5; d][..]);
    assert_eq!(&edited.output[..3 * d], &base.output[..3 * d]);
    assert_ne!(&edited.output[3 * d..], &base.output[3 * d..]);
    let loss = edited.loss().unwrap();
    assert!(loss.is_finite() && loss != base.loss().unwrap());
}

/// `loss_vocab`: the softmax over a few ids, checked against the full
/// logits in f64, equal to the model's loss over the whole vocabulary, and
/// below it otherwise; tied and untied heads, with Gemma 3's (1 + w) final norm.
#[test]
fn a_restricted_vocabulary_loss_is_the_softmax_over_those_ids() {
    for name in ["llama-tied-f32", "gemma3-tied-f32", "qwen2-untied-f16"] {
        let checkpoint = Checkpoint::open(&fixture(name)).unwrap();
        let mut engine = Engine::open(&checkpoint, EngineOptions::default()).unwrap();
        let tokens = [3u32, 14, 15, 92, 65, 35];
        let logits_only = Capture {
            logits: true,
            ..Capture::default()
        };
        let base = run(&mut engine, &tokens, logits_only);
        let over = |engine: &mut Engine, ids: &[u32]| {
            engine
                .run(&Request {
                    tokens: &tokens,
                    capture: logits_only,
                    loss_vocab: Some(ids),
                    ..Request::default()
                })
                .unwrap()
        };
        let every: Vec<u32> = (0..base.vocab as u32).collect();
        let whole = over(&mut engine, &every).loss().unwrap();
        assert!(
            (whole - base.loss().unwrap()).abs() < 1e-5,
            "{name}: {whole}"
        );

        let few = [7u32, 0, 51, 7];
        let restricted = over(&mut engine, &few);
        let mut ids: Vec<u32> = few.iter().chain(&tokens).copied().collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(restricted.vocab_ids.as_deref(), Some(&ids[..]));
        let full = base.logits.as_ref().unwrap();
        let expected: f64 = (0..tokens.len() - 1)
            .map(|t| {
                let row = &full[t * base.vocab..(t + 1) * base.vocab];
                let lse = ids
                    .iter()
                    .map(|&i| (row[i as usize] as f64).exp())
                    .sum::<f64>()
                    .ln();
                lse - row[tokens[t + 1] as usize] as f64
            })
            .sum::<f64>()
            / (tokens.len() - 1) as f64;
        let got = restricted.loss().unwrap();
        assert!((got - expected).abs() < 1e-5, "{name}: {got} vs {expected}");
        assert!(
            got < base.loss().unwrap() - 1e-3,
            "{name}: fewer ids, less mass"
        );

        let outside = engine.run(&Request {
            tokens: &tokens,
            capture: logits_only,
            loss_vocab: Some(&[base.vocab as u32]),
            ..Request::default()
        });
        let message = outside.unwrap_err().to_string();
        let wanted = format!("loss vocabulary id {} is outside", base.vocab);
        assert!(message.contains(&wanted), "{message}");
    }
}

/// Every array of two traces, value by value, to `tolerance` relative
/// (absolute below 1): what a batch (or a budget) gives against one run.
pub fn assert_same_trace(name: &str, batch: &Trace, alone: &Trace, tolerance: f32) {
    let close = |what: &str, a: &[f32], b: &[f32]| {
        assert_eq!(a.len(), b.len(), "{name}: {what} length");
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!(
                (x - y).abs() <= tolerance * y.abs().max(1.0),
                "{name}: {what}[{i}] {x} in the batch, {y} alone"
            );
        }
    };
    assert_eq!(batch.blocks, alone.blocks, "{name}: blocks");
    close("output", &batch.output, &alone.output);
    let lists = [
        ("residuals", &batch.residuals, &alone.residuals),
        ("attn_updates", &batch.attn_updates, &alone.attn_updates),
        ("mlp_updates", &batch.mlp_updates, &alone.mlp_updates),
        ("attention", &batch.attention, &alone.attention),
        ("z", &batch.z, &alone.z),
    ];
    for (what, a, b) in lists {
        assert_eq!(a.len(), b.len(), "{name}: {what} count");
        for (x, y) in a.iter().zip(b.iter()) {
            close(what, x, y);
        }
    }
    match (&batch.logits, &alone.logits) {
        (Some(a), Some(b)) => close("logits", a, b),
        (a, b) => assert_eq!(a.is_some(), b.is_some(), "{name}: logits"),
    }
    assert_eq!(batch.vocab_ids, alone.vocab_ids, "{name}: vocab ids");
    match (batch.loss(), alone.loss()) {
        (Some(a), Some(b)) => assert!((a - b).abs() < 1e-5, "{name}: loss {a} vs {b}"),
        (a, b) => assert_eq!(a.is_some(), b.is_some(), "{name}: loss"),
    }
}

#[test]
fn a_batch_gives_what_each_request_gives_alone_in_fewer_block_runs() {
    let families = [
        "llama-tied-f32",
        "llama-untied-bf16",
        "qwen2-untied-f16",
        "qwen3-tied-bf16",
        "gemma3-tied-f32",
        "gpt2-tied-f32",
        "bert-f32",
    ];
    for name in families {
        let checkpoint = Checkpoint::open(&fixture(name)).unwrap();
        let mut engine = Engine::open(&checkpoint, EngineOptions::default()).unwrap();
        let n = engine.num_blocks();
        let head = name != "bert-f32";
        let hidden = engine.arch.hidden;
        let short: Vec<u32> = vec![5, 9, 2, 7, 30];
        let long: Vec<u32> = (1..=9).collect();
        let reversed: Vec<usize> = (0..n).rev().collect();
        let tail: Vec<usize> = (1..n).collect();
        let start = run(&mut engine, &long, Capture::default()).output;
        let edits = [Edit::add(1, 2, vec![0.5; hidden])];
        let few = [3u32, 8, 8, 40];
        let loss = Capture {
            loss: head,
            ..Capture::default()
        };
        let all = Capture {
            logits: head,
            loss: head,
            ..everything()
        };
        let requests = [
            Request {
                tokens: &long,
                capture: Capture { loss: false, ..all },
                ..Request::default()
            },
            Request {
                tokens: &short,
                blocks: Some(&reversed),
                capture: Capture {
                    logits: false,
                    ..all
                },
                edits: &edits,
                ..Request::default()
            },
            // A chain that starts later and shares the last blocks of the
            // first: it runs beside it once both have as many blocks left.
            Request {
                tokens: &long,
                blocks: Some(&tail),
                start: Some(&start),
                capture: Capture {
                    residuals: true,
                    ..loss
                },
                loss_vocab: head.then_some(&few[..]),
                ..Request::default()
            },
            Request {
                tokens: &short,
                blocks: Some(&[]),
                capture: loss,
                ..Request::default()
            },
            Request {
                tokens: &long,
                capture: loss,
                ..Request::default()
            },
        ];
        let before = engine.block_runs();
        let alone: Vec<Trace> = requests.iter().map(|r| engine.run(r).unwrap()).collect();
        let runs_alone = engine.block_runs() - before;
        let batch = engine.run_batch(&requests).unwrap();
        let runs_batch = engine.block_runs() - before - runs_alone;
        assert_eq!(batch.len(), requests.len());
        for (i, (b, a)) in batch.iter().zip(&alone).enumerate() {
            assert_same_trace(&format!("{name} request {i}"), b, a, 1e-4);
        }
        // Loss-only requests keep no logits.
        assert!(batch[4].logits.is_none() && alone[4].logits.is_none());
        assert_eq!(batch[4].loss().is_some(), head, "{name}");
        assert_eq!(runs_alone, 4 * n - 1, "{name}");
        assert!(
            runs_batch < runs_alone - n,
            "{name}: {runs_batch} stacked runs for {runs_alone} alone"
        );
    }
}

/// Each sublayer run alone, on the residual it sees inside the block: the
/// attention sublayer on the block's input gives the block's midpoint (its
/// update and probabilities are the whole block's), the MLP sublayer on that
/// midpoint gives the block's output — on every family, BERT's post-norms
/// included. Sublayer requests in one batch with whole-block requests run
/// apart and give what they give alone; the other sublayer's update is zero.
#[test]
fn each_sublayer_alone_composes_into_the_block() {
    let families = ONE_OF_EACH_FAMILY;
    let tokens: Vec<u32> = vec![3, 17, 4, 9, 22, 5, 11];
    let close = |what: &str, a: &[f32], b: &[f32]| {
        assert_eq!(a.len(), b.len(), "{what}: length");
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!(
                (x - y).abs() <= 2e-5 * y.abs().max(1.0),
                "{what}[{i}]: {x} vs {y}"
            );
        }
    };
    for name in families {
        let checkpoint = Checkpoint::open(&fixture(name)).unwrap();
        let mut engine = Engine::open(&checkpoint, EngineOptions::default()).unwrap();
        let whole = run(&mut engine, &tokens, everything_but_logits());
        let post_norm = name == "bert-f32";
        for block in 0..engine.num_blocks() {
            let what = |part: &str| format!("{name} block {block} {part}");
            let x = &whole.residuals[block];
            let blocks = [block];
            let sublayer = |sublayer, start| Request {
                tokens: &tokens,
                blocks: Some(&blocks),
                start: Some(start),
                capture: Capture {
                    updates: true,
                    attention: sublayer == Sublayer::Attention,
                    ..Capture::default()
                },
                sublayer: Some(sublayer),
                ..Request::default()
            };
            let attention = engine.run(&sublayer(Sublayer::Attention, x)).unwrap();
            let midpoint = attention.output.clone();
            close(
                &what("attn update"),
                &attention.attn_updates[0],
                &whole.attn_updates[block],
            );
            close(
                &what("attention"),
                &attention.attention[0],
                &whole.attention[block],
            );
            assert!(
                attention.mlp_updates[0].iter().all(|&v| v == 0.0),
                "{}",
                what("no mlp")
            );
            if !post_norm {
                let sum: Vec<f32> = x
                    .iter()
                    .zip(&whole.attn_updates[block])
                    .map(|(a, b)| a + b)
                    .collect();
                close(&what("midpoint"), &midpoint, &sum);
            }
            let mlp = engine.run(&sublayer(Sublayer::Mlp, &midpoint)).unwrap();
            close(
                &what("mlp update"),
                &mlp.mlp_updates[0],
                &whole.mlp_updates[block],
            );
            close(&what("output"), &mlp.output, &whole.residuals[block + 1]);
            assert!(
                mlp.attn_updates[0].iter().all(|&v| v == 0.0),
                "{}",
                what("no attn")
            );
            assert!(mlp.attention.is_empty(), "{}", what("no maps"));

            // In one batch with the whole block on the same residual.
            let requests = [
                sublayer(Sublayer::Mlp, &midpoint),
                Request {
                    tokens: &tokens,
                    blocks: Some(&blocks),
                    start: Some(x),
                    capture: Capture {
                        updates: true,
                        ..Capture::default()
                    },
                    ..Request::default()
                },
                sublayer(Sublayer::Attention, x),
            ];
            let batch = engine.run_batch(&requests).unwrap();
            close(&what("batched mlp"), &batch[0].output, &mlp.output);
            close(
                &what("batched block"),
                &batch[1].output,
                &whole.residuals[block + 1],
            );
            close(&what("batched attention"), &batch[2].output, &midpoint);
        }
        // MLP-only runs have no attention maps to give.
        let refused = engine.run(&Request {
            tokens: &tokens,
            capture: Capture {
                attention: true,
                ..Capture::default()
            },
            sublayer: Some(Sublayer::Mlp),
            ..Request::default()
        });
        let message = refused.unwrap_err().to_string();
        assert!(message.contains("no attention probabilities"), "{message}");
    }
}

fn everything_but_logits() -> Capture {
    Capture {
        logits: false,
        loss: false,
        ..everything()
    }
}

/// Edits inside a block run — a sublayer's output (`hook_attn_out`,
/// `hook_mlp_out`) or one head's output before the output projection
/// (`hook_z`) — against the same patched run computed by hand from the
/// engine's captured activations: the new midpoint or block output written
/// here (a head's change through its columns of the stored output
/// projection), then the rest of the block and the blocks after it run from
/// there. On llama, qwen2, qwen3 and GPT-2 (Conv1D, biases); Gemma 3 and
/// BERT (post-norms) check that patching a value with itself changes
/// nothing. Also: an MLP-output `add` is a residual `add` after the block; a
/// batch mixing patched and plain requests gives each what it gives alone;
/// bad hooks are refused.
#[test]
fn edits_inside_a_block_equal_the_patched_run_computed_by_hand() {
    let families = ONE_OF_EACH_FAMILY;
    let clean: Vec<u32> = vec![3, 17, 4, 9, 22, 5, 11];
    let corrupt: Vec<u32> = vec![3, 17, 8, 9, 30, 5, 11];
    let close = |what: &str, a: &[f32], b: &[f32]| {
        assert_eq!(a.len(), b.len(), "{what}: length");
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!(
                (x - y).abs() <= 2e-4 * y.abs().max(1.0),
                "{what}[{i}]: {x} vs {y}"
            );
        }
    };
    for name in families {
        let checkpoint = Checkpoint::open(&fixture(name)).unwrap();
        let schema = Schema::of(&checkpoint);
        let mut engine = Engine::open(&checkpoint, EngineOptions::default()).unwrap();
        let n = engine.num_blocks();
        let (d, heads, dh) = (engine.arch.hidden, engine.arch.heads, engine.arch.head_dim);
        let by_hand = !matches!(name, "gemma3-tied-f32" | "bert-f32");
        let capture = Capture {
            residuals: true,
            updates: true,
            z: true,
            ..Capture::default()
        };
        let clean_run = run(&mut engine, &clean, capture);
        let corrupt_run = run(&mut engine, &corrupt, capture);
        assert_eq!(clean_run.z.len(), n);
        assert_eq!(clean_run.z[0].len(), clean.len() * heads * dh);
        let (l, p, head) = (1usize, 4usize, 1usize);
        let row = |v: &[f32], width: usize| v[p * width..(p + 1) * width].to_vec();
        let patched = |engine: &mut Engine, edit: Edit| -> Vec<f32> {
            engine
                .run(&Request {
                    tokens: &corrupt,
                    edits: std::slice::from_ref(&edit),
                    ..Request::default()
                })
                .unwrap()
                .output
        };
        let from_block = |engine: &mut Engine, x: &[f32], first: usize| -> Vec<f32> {
            let rest: Vec<usize> = (first..n).collect();
            engine
                .run(&Request {
                    tokens: &corrupt,
                    blocks: Some(&rest),
                    start: Some(x),
                    ..Request::default()
                })
                .unwrap()
                .output
        };
        // The rest of the model from a residual `mid` at block l's midpoint.
        let from_midpoint = |engine: &mut Engine, mid: &[f32]| -> Vec<f32> {
            let blocks = [l];
            let after = engine
                .run(&Request {
                    tokens: &corrupt,
                    blocks: Some(&blocks),
                    start: Some(mid),
                    sublayer: Some(Sublayer::Mlp),
                    ..Request::default()
                })
                .unwrap()
                .output;
            from_block(engine, &after, l + 1)
        };
        let x = &corrupt_run.residuals[l];
        let attn = &corrupt_run.attn_updates[l];

        // Attention output at (l, p) replaced by the clean run's.
        let clean_attn = row(&clean_run.attn_updates[l], d);
        let got = patched(
            &mut engine,
            Edit::replace(l, p, clean_attn.clone()).at(Hook::AttnOut),
        );
        if by_hand {
            let mut mid: Vec<f32> = x.iter().zip(attn).map(|(a, b)| a + b).collect();
            for (k, v) in clean_attn.iter().enumerate() {
                mid[p * d + k] = x[p * d + k] + v;
            }
            close(
                &format!("{name} attn_out"),
                &got,
                &from_midpoint(&mut engine, &mid),
            );
        }
        // MLP output at (l, p) replaced by the clean run's.
        let clean_mlp = row(&clean_run.mlp_updates[l], d);
        let got = patched(
            &mut engine,
            Edit::replace(l, p, clean_mlp.clone()).at(Hook::MlpOut),
        );
        if by_hand {
            let mut out = corrupt_run.residuals[l + 1].clone();
            for (k, v) in clean_mlp.iter().enumerate() {
                out[p * d + k] += v - corrupt_run.mlp_updates[l][p * d + k];
            }
            close(
                &format!("{name} mlp_out"),
                &got,
                &from_block(&mut engine, &out, l + 1),
            );
            // Steering the MLP output is steering the residual after the block.
            let v: Vec<f32> = (0..d).map(|k| 0.1 * (k as f32).sin()).collect();
            let a = patched(&mut engine, Edit::add(l, p, v.clone()).at(Hook::MlpOut));
            let b = patched(&mut engine, Edit::add(l + 1, p, v));
            close(&format!("{name} mlp_out add"), &a, &b);
        }
        // Head `head`'s output at (l, p) replaced by the clean run's.
        let width = heads * dh;
        let z_clean = clean_run.z[l][p * width + head * dh..p * width + (head + 1) * dh].to_vec();
        let z_corrupt = &corrupt_run.z[l][p * width + head * dh..p * width + (head + 1) * dh];
        let got = patched(
            &mut engine,
            Edit::replace(l, p, z_clean.clone()).at(Hook::Z { head }),
        );
        if by_hand {
            // Its change reaches the residual through the head's columns of
            // the output projection (rows of GPT-2's Conv1D).
            let o = checkpoint
                .tensors()
                .iter()
                .zip(&schema.placements)
                .find(|(_, pl)| pl.layer == Some(l) && pl.role.to_string() == "o" && !pl.bias)
                .map(|(t, _)| {
                    checkpoint
                        .tensor(&t.name)
                        .unwrap()
                        .to_f32()
                        .unwrap()
                        .to_vec()
                })
                .unwrap();
            let transposed = name.starts_with("gpt2");
            let mut mid: Vec<f32> = x.iter().zip(attn).map(|(a, b)| a + b).collect();
            for out in 0..d {
                let change: f32 = (0..dh)
                    .map(|j| {
                        let col = head * dh + j;
                        let w = if transposed {
                            o[col * d + out]
                        } else {
                            o[out * width + col]
                        };
                        w * (z_clean[j] - z_corrupt[j])
                    })
                    .sum();
                mid[p * d + out] += change;
            }
            close(
                &format!("{name} z"),
                &got,
                &from_midpoint(&mut engine, &mid),
            );
        } else {
            // A head patched with its own value changes nothing.
            let same = patched(
                &mut engine,
                Edit::replace(l, p, z_corrupt.to_vec()).at(Hook::Z { head }),
            );
            close(&format!("{name} z identity"), &same, &corrupt_run.output);
        }
        // The patch moved something (a patch that is ignored fails here).
        assert!(
            got.iter()
                .zip(&corrupt_run.output)
                .any(|(a, b)| (a - b).abs() > 1e-4),
            "{name}: the z patch changed nothing"
        );

        // One batch: patched requests at different runs and hooks beside a
        // plain one, each what it gives alone.
        let edits = [
            vec![Edit::replace(l, p, clean_attn.clone()).at(Hook::AttnOut)],
            vec![],
            vec![Edit::replace(0, 2, z_clean.clone()).at(Hook::Z { head: 0 })],
            vec![Edit::replace(l, p, clean_mlp.clone()).at(Hook::MlpOut)],
        ];
        let requests: Vec<Request> = edits
            .iter()
            .map(|e| Request {
                tokens: &corrupt,
                edits: e,
                capture: Capture {
                    z: true,
                    ..Capture::default()
                },
                ..Request::default()
            })
            .collect();
        let alone: Vec<Trace> = requests.iter().map(|r| engine.run(r).unwrap()).collect();
        let batch = engine.run_batch(&requests).unwrap();
        for (k, (a, b)) in batch.iter().zip(&alone).enumerate() {
            close(&format!("{name} batch {k}"), &a.output, &b.output);
            close(&format!("{name} batch {k} z"), &a.z[n - 1], &b.z[n - 1]);
        }

        // Refused: a run that does not exist, a head the model lacks, the
        // wrong width, a hook inside a sublayer-only run.
        let mut bad = |edit: Edit, sublayer: Option<Sublayer>| {
            let e = [edit];
            engine_error(&mut engine, &corrupt, &e, sublayer)
        };
        assert!(bad(Edit::replace(n, 0, vec![0.0; d]).at(Hook::AttnOut), None).contains("only"));
        assert!(bad(
            Edit::replace(0, 0, vec![0.0; dh]).at(Hook::Z { head: heads }),
            None
        )
        .contains("heads"));
        assert!(bad(
            Edit::replace(0, 0, vec![0.0; d]).at(Hook::Z { head: 0 }),
            None
        )
        .contains("a head's output"));
        assert!(bad(
            Edit::replace(0, 0, vec![0.0; d]).at(Hook::MlpOut),
            Some(Sublayer::Mlp)
        )
        .contains("whole block"));
    }
}

/// Edited runs in one batch that share tokens, start and blocks run as the
/// rows from their first edit on over one unedited base run (its keys and
/// values cached): each gives what it gives alone, where it runs whole —
/// residual edits at several stages, sublayer outputs and one head's
/// output, runs that start inside the model, the loss from the reassembled
/// final residual — on every causal family (Gemma 3's sliding window
/// included); a bidirectional model runs whole.
#[test]
fn edited_runs_over_a_shared_base_equal_whole_runs() {
    let families = ONE_OF_EACH_FAMILY;
    let tokens: Vec<u32> = vec![3, 17, 4, 9, 22, 5, 11, 8, 30];
    let other: Vec<u32> = vec![3, 17, 4, 9, 22, 5, 11, 8, 31];
    let t = tokens.len();
    for name in families {
        let checkpoint = Checkpoint::open(&fixture(name)).unwrap();
        let mut engine = Engine::open(&checkpoint, EngineOptions::default()).unwrap();
        let n = engine.num_blocks();
        let (d, heads, dh) = (engine.arch.hidden, engine.arch.heads, engine.arch.head_dim);
        let whole = run(
            &mut engine,
            &tokens,
            Capture {
                residuals: true,
                ..Capture::default()
            },
        );
        let start = whole.residuals[1].clone();
        let rest: Vec<usize> = (1..n).collect();
        let vector = |seed: usize, width: usize| -> Vec<f32> {
            (0..width)
                .map(|k| 0.5 * ((seed * 31 + k) as f32).sin())
                .collect()
        };
        // Every kind of edit at every position from 1 on, and a few that
        // combine two edits.
        let mut edits: Vec<Vec<Edit>> = Vec::new();
        for p in 1..t {
            edits.push(vec![Edit::replace(0, p, vector(p, d))]);
            edits.push(vec![Edit::replace(1, p, vector(p + 1, d)).at(Hook::AttnOut)]);
            edits.push(vec![Edit::add(0, p, vector(p + 2, d)).at(Hook::MlpOut)]);
            edits.push(vec![
                Edit::replace(n - 1, p, vector(p + 3, dh)).at(Hook::Z { head: heads - 1 })
            ]);
        }
        edits.push(vec![
            Edit::replace(0, 3, vector(7, dh)).at(Hook::Z { head: 0 }),
            Edit::add(2, 5, vector(8, d)),
        ]);
        let mut requests: Vec<Request> = edits
            .iter()
            .map(|e| Request {
                tokens: &tokens,
                edits: e,
                ..Request::default()
            })
            .collect();
        // Runs that start from block 1's input (their stages count from it),
        // some asking for the loss, and runs of other tokens: their own bases.
        let late: Vec<Vec<Edit>> = (2..t)
            .map(|p| vec![Edit::replace(0, p, vector(p + 4, d))])
            .collect();
        for (k, e) in late.iter().enumerate() {
            requests.push(Request {
                tokens: &tokens,
                blocks: Some(&rest),
                start: Some(&start),
                edits: e,
                capture: Capture {
                    loss: k % 2 == 0 && name != "bert-f32",
                    ..Capture::default()
                },
                ..Request::default()
            });
            requests.push(Request {
                tokens: &other,
                edits: e,
                ..Request::default()
            });
        }
        let before = engine.rows_reused();
        let batch = engine.run_batch(&requests).unwrap();
        let reused = engine.rows_reused() - before;
        if name == "bert-f32" {
            assert_eq!(reused, 0, "{name}: a bidirectional model reuses no rows");
        } else {
            assert!(reused > 0, "{name}: no run reused its base's rows");
        }
        for (k, (request, got)) in requests.iter().zip(&batch).enumerate() {
            let before = engine.rows_reused();
            let alone = engine.run(request).unwrap();
            assert_eq!(engine.rows_reused(), before, "a run alone runs whole");
            assert_eq!(got.output.len(), alone.output.len());
            for (i, (a, b)) in got.output.iter().zip(&alone.output).enumerate() {
                assert!(
                    (a - b).abs() <= 2e-4 * b.abs().max(1.0),
                    "{name} request {k} [{i}]: {a} vs {b}"
                );
            }
            match (got.loss(), alone.loss()) {
                (Some(a), Some(b)) => {
                    assert!(
                        (a - b).abs() <= 1e-4 * b.abs(),
                        "{name} loss {k}: {a} vs {b}"
                    )
                }
                (None, None) => {}
                other => panic!("{name} request {k}: loss {other:?}"),
            }
        }
        // The edits moved the output (a suffix that ignored them fails here).
        assert!(batch[0]
            .output
            .iter()
            .zip(&whole.output)
            .any(|(a, b)| (a - b).abs() > 1e-3));
    }
}

fn engine_error(
    engine: &mut Engine,
    tokens: &[u32],
    edits: &[Edit],
    sublayer: Option<Sublayer>,
) -> String {
    engine
        .run(&Request {
            tokens,
            edits,
            sublayer,
            ..Request::default()
        })
        .unwrap_err()
        .to_string()
}

/// Requests of different lengths and layouts (plain, branched two ways)
/// share one session run per block — one sequence under a block-diagonal
/// mask — and each gets what it gets alone: residuals, updates, its own
/// block of the attention maps, logits. Gemma 3's window (4) is shorter than
/// most of them; GPT-2's positions are learned; BERT attends both ways.
#[test]
fn requests_of_different_shapes_pack_into_one_run_per_block() {
    let families = ONE_OF_EACH_FAMILY;
    let plain_a: Vec<u32> = vec![5, 9, 2, 7, 30];
    let plain_b: Vec<u32> = (1..=9).collect();
    let forked: Vec<u32> = vec![4, 4, 6, 11, 12, 3, 2];
    let forked_at_3 = Branches {
        prefix: 3,
        lengths: vec![2, 2],
    };
    let forked_at_2 = Branches {
        prefix: 2,
        lengths: vec![4, 1],
    };
    for name in families {
        let checkpoint = Checkpoint::open(&fixture(name)).unwrap();
        let mut engine = Engine::open(&checkpoint, EngineOptions::default()).unwrap();
        let causal = name != "bert-f32";
        let plain = |tokens| Request {
            tokens,
            capture: Capture {
                logits: causal,
                loss: causal,
                ..everything()
            },
            ..Request::default()
        };
        let branched = |branches| Request {
            tokens: &forked,
            branches: Some(branches),
            capture: Capture {
                logits: false,
                loss: false,
                ..everything()
            },
            ..Request::default()
        };
        let mut requests = vec![plain(&plain_a), plain(&plain_b)];
        if causal {
            requests.extend([branched(&forked_at_3), branched(&forked_at_2)]);
        }
        let alone: Vec<Trace> = requests.iter().map(|r| engine.run(r).unwrap()).collect();
        let before = engine.block_runs();
        let batch = engine.run_batch(&requests).unwrap();
        assert_eq!(engine.block_runs() - before, engine.num_blocks(), "{name}");
        for (i, (b, a)) in batch.iter().zip(&alone).enumerate() {
            assert_same_trace(&format!("{name} request {i}"), b, a, 1e-4);
        }
    }
}

#[test]
fn branches_give_each_continuation_what_its_own_pass_gives() {
    // Gemma 3's sliding window (4) is shorter than prefix + branch, and
    // GPT-2's positions are learned: both must see the branch's positions
    // continue from the prefix, not from the rows before it.
    let families = [
        "llama-tied-f32",
        "qwen2-untied-f16",
        "qwen3-tied-bf16",
        "gemma3-tied-f32",
        "gpt2-tied-f32",
    ];
    let prefix: Vec<u32> = vec![5, 9, 2, 7];
    let continuations: [Vec<u32>; 3] = [vec![30, 1, 4], vec![11, 12, 13, 14, 15], vec![8]];
    let branches = Branches {
        prefix: prefix.len(),
        lengths: continuations.iter().map(Vec::len).collect(),
    };
    let mut tokens = prefix.clone();
    continuations.iter().for_each(|c| tokens.extend(c));
    for name in families {
        let checkpoint = Checkpoint::open(&fixture(name)).unwrap();
        let mut engine = Engine::open(&checkpoint, EngineOptions::default()).unwrap();
        let hidden = engine.arch.hidden;
        let request = Request {
            tokens: &tokens,
            branches: Some(&branches),
            capture: Capture {
                residuals: true,
                ..Capture::default()
            },
            ..Request::default()
        };
        // Two alike stack into one run per block.
        let runs_before = engine.block_runs();
        let both = engine
            .run_batch(&[request.clone(), request.clone()])
            .unwrap();
        assert_eq!(
            engine.block_runs() - runs_before,
            engine.num_blocks(),
            "{name}"
        );
        let branched = &both[0];
        for (b, continuation) in continuations.iter().enumerate() {
            let mut own = prefix.clone();
            own.extend(continuation);
            let alone = run(&mut engine, &own, everything());
            let at = branches.start(b);
            for (stage, (got, want)) in branched.residuals.iter().zip(&alone.residuals).enumerate()
            {
                let rows = |m: &[f32], from: usize, n: usize| {
                    m[from * hidden..(from + n) * hidden].to_vec()
                };
                let pairs = [
                    (rows(got, 0, prefix.len()), rows(want, 0, prefix.len())),
                    (
                        rows(got, at, continuation.len()),
                        rows(want, prefix.len(), continuation.len()),
                    ),
                ];
                for (g, w) in pairs {
                    let worst = g
                        .iter()
                        .zip(&w)
                        .map(|(a, b)| (a - b).abs() / b.abs().max(1.0))
                        .fold(0.0f32, f32::max);
                    assert!(worst < 1e-4, "{name} branch {b} stage {stage}: {worst}");
                }
            }
        }
    }
    // What branches cannot do: encoders, losses, layouts that do not add up.
    let bert = Checkpoint::open(&fixture("bert-f32")).unwrap();
    let mut engine = Engine::open(&bert, EngineOptions::default()).unwrap();
    let error = engine
        .run(&Request {
            tokens: &tokens,
            branches: Some(&branches),
            ..Request::default()
        })
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("branches need a causal model; bert attends both ways"),
        "{error}"
    );
    let llama = Checkpoint::open(&fixture("llama-tied-f32")).unwrap();
    let mut engine = Engine::open(&llama, EngineOptions::default()).unwrap();
    let error = engine
        .run(&Request {
            tokens: &tokens,
            branches: Some(&branches),
            capture: Capture {
                loss: true,
                ..Capture::default()
            },
            ..Request::default()
        })
        .unwrap_err()
        .to_string();
    assert!(error.contains("no logits or loss"), "{error}");
    let error = engine
        .run(&Request {
            tokens: &tokens[..10],
            branches: Some(&branches),
            ..Request::default()
        })
        .unwrap_err()
        .to_string();
    assert!(error.contains("do not add up to the 10 tokens"), "{error}");
}

/// Greedy generation the slow way: the whole sequence again for every new
/// token, the top-1 id of its last row (equal logits: the lower id).
fn generate_by_rerunning(engine: &mut Engine, prompt: &[u32], max_new: usize) -> Vec<u32> {
    let mut tokens = prompt.to_vec();
    let mut added = Vec::new();
    while added.len() < max_new {
        let trace = run(
            engine,
            &tokens,
            Capture {
                logits: true,
                ..Capture::default()
            },
        );
        let logits = trace.logits.unwrap();
        let last = &logits[logits.len() - trace.vocab..];
        let best = (0..last.len()).fold(0, |b, v| if last[v] > last[b] { v } else { b }) as u32;
        tokens.push(best);
        added.push(best);
    }
    added
}

#[test]
fn generation_with_the_cache_gives_what_rerunning_the_sequence_gives() {
    // Prompts of different lengths (the shorter ones' caches are padded),
    // past Gemma 3's sliding window of 4 and on GPT-2's learned positions;
    // some prompts stop early at a stop token, so the batch shrinks mid-way.
    let prompts: [Vec<u32>; 4] = [
        vec![5, 9, 2, 7, 30],
        (1..=9).collect(),
        vec![42],
        vec![4, 4, 6, 11, 12, 3, 2, 17, 60, 61, 62, 1],
    ];
    let max_new = 9;
    for name in crate::util::DECODER_FIXTURES {
        let checkpoint = Checkpoint::open(&fixture(name)).unwrap();
        let mut engine = Engine::open(&checkpoint, EngineOptions::default()).unwrap();
        let free: Vec<Vec<u32>> = prompts
            .iter()
            .map(|p| generate_by_rerunning(&mut engine, p, max_new))
            .collect();
        // The first token prompt 0 makes after its first that it had not made
        // before stops it; the others go on unless they make it too.
        // Greedy generation with a stop token is the free one cut after the
        // token's first appearance. Take a stop token that ends some prompts
        // early and not others, so the batch shrinks mid-way.
        let cut = |stop: u32| -> Vec<Vec<u32>> {
            free.iter()
                .map(|f| match f.iter().position(|&id| id == stop) {
                    Some(k) => f[..=k].to_vec(),
                    None => f.clone(),
                })
                .collect()
        };
        let (stop, expected) = free
            .iter()
            .flatten()
            .map(|&id| (id, cut(id)))
            .find(|(_, e)| {
                e.iter().any(|c| c.len() < max_new) && e.iter().any(|c| c.len() == max_new)
            })
            .expect("a token that stops some prompts and not others");
        let stop = [stop];
        let slices: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
        let before = engine.block_runs();
        let cached = engine.generate(&slices, max_new, &stop).unwrap();
        assert_eq!(cached, expected, "{name}");
        // One packed prompt pass, then one run per block per new token.
        assert_eq!(
            engine.block_runs() - before,
            engine.num_blocks() * max_new,
            "{name}"
        );
        assert_eq!(
            engine.generate(&slices, max_new, &[]).unwrap(),
            free,
            "{name} without a stop token"
        );
        assert!(engine
            .generate(&slices, 0, &[])
            .unwrap()
            .iter()
            .all(Vec::is_empty));
    }
    let checkpoint = Checkpoint::open(&fixture("bert-f32")).unwrap();
    let mut engine = Engine::open(&checkpoint, EngineOptions::default()).unwrap();
    let refused = engine.generate(&[&[1, 2, 3]], 4, &[]).unwrap_err();
    assert!(refused.to_string().contains("cannot generate"), "{refused}");
}

#[test]
fn gemma3_sliding_layers_see_only_their_window() {
    let checkpoint = Checkpoint::open(&fixture("gemma3-tied-f32")).unwrap();
    let mut engine = Engine::open(&checkpoint, EngineOptions::default()).unwrap();
    let tokens: Vec<u32> = (1..=7).collect();
    let trace = run(&mut engine, &tokens, everything());
    let (t, h) = (tokens.len(), trace.heads);
    // layer_types: sliding, sliding, full; sliding_window = 4.
    for (block, window) in [(0, Some(4)), (1, Some(4)), (2, None)] {
        let probs = &trace.attention[block];
        for head in 0..h {
            let last = &probs[(head * t + t - 1) * t..(head * t + t) * t];
            let seen = last.iter().filter(|&&p| p > 0.0).count();
            assert_eq!(seen, window.unwrap_or(t), "block {block} head {head}");
        }
    }
}

/// `kinds` runs a block with another index's attention pattern and rotary
/// table: blocks [2, 0, 1] of the Gemma 3 fixture (sliding, sliding, full)
/// with kinds [0, 2, 2] are the same computation as those blocks of a copy
/// whose config makes block 2 sliding and blocks 0 and 1 full, run with
/// their own kinds — in one batch with a request that reads its own kinds,
/// so stacks split by kind.
#[test]
fn kinds_give_a_block_run_another_index_s_pattern_and_rotary_table() {
    let original = fixture("gemma3-tied-f32");
    let dir = crate::util::tempdir();
    crate::util::copy_dir(&original, dir.path());
    let config_path = dir.path().join("config.json");
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    config["layer_types"] =
        serde_json::json!(["full_attention", "full_attention", "sliding_attention"]);
    std::fs::write(&config_path, config.to_string()).unwrap();

    let tokens: Vec<u32> = (1..=7).collect();
    let blocks = [2, 0, 1];
    let capture = Capture {
        residuals: true,
        attention: true,
        ..Capture::default()
    };
    let relabelled = Checkpoint::open(dir.path()).unwrap();
    let mut engine = Engine::open(&relabelled, EngineOptions::default()).unwrap();
    let expected = engine
        .run(&Request {
            tokens: &tokens,
            blocks: Some(&blocks),
            capture,
            ..Request::default()
        })
        .unwrap();

    let checkpoint = Checkpoint::open(&original).unwrap();
    let kind_ids = |c: &Checkpoint| {
        probe::arch::Arch::of(c, &Schema::of(c))
            .unwrap()
            .0
            .block_kind_ids()
    };
    assert_eq!(kind_ids(&checkpoint), [0, 0, 1]);
    assert_eq!(kind_ids(&relabelled), [0, 0, 1], "full, full, sliding");
    let mut engine = Engine::open(&checkpoint, EngineOptions::default()).unwrap();
    let kinds = [0, 2, 2];
    let traces = engine
        .run_batch(&[
            Request {
                tokens: &tokens,
                blocks: Some(&blocks),
                kinds: Some(&kinds),
                capture,
                ..Request::default()
            },
            Request {
                tokens: &tokens,
                blocks: Some(&blocks),
                capture,
                ..Request::default()
            },
        ])
        .unwrap();
    let close = |a: &[f32], b: &[f32]| {
        a.len() == b.len()
            && a.iter()
                .zip(b)
                .all(|(x, y)| (x - y).abs() <= 1e-5 * (1.0 + y.abs()))
    };
    for (stage, (got, want)) in traces[0]
        .residuals
        .iter()
        .zip(&expected.residuals)
        .enumerate()
    {
        assert!(close(got, want), "stage {stage}");
    }
    // The first run slides (window 4), the other two see every row; the
    // request without kinds slides in its second and third runs.
    let t = tokens.len();
    let seen = |trace: &Trace, run: usize| {
        trace.attention[run][(t - 1) * t..t * t]
            .iter()
            .filter(|&&p| p > 0.0)
            .count()
    };
    assert_eq!(
        (0..3).map(|r| seen(&traces[0], r)).collect::<Vec<_>>(),
        [4, 7, 7]
    );
    assert_eq!(
        (0..3).map(|r| seen(&traces[1], r)).collect::<Vec<_>>(),
        [7, 4, 4]
    );
    assert!(!close(&traces[1].output, &traces[0].output));

    let refused = engine
        .run(&Request {
            tokens: &tokens,
            blocks: Some(&blocks),
            kinds: Some(&[0, 1]),
            ..Request::default()
        })
        .unwrap_err();
    assert!(
        refused.to_string().contains("2 kinds for 3 block runs"),
        "{refused}"
    );
    let refused = engine
        .run(&Request {
            tokens: &tokens,
            kinds: Some(&[0, 1, 3]),
            ..Request::default()
        })
        .unwrap_err();
    assert!(refused.to_string().contains("kind of block 3"), "{refused}");
}

#[test]
fn forward_command_prints_predictions_loss_and_norms() {
    let model = fixture("llama-tied-f32");
    let out = probe([
        "forward".as_ref(),
        model.as_os_str(),
        "--tokens".as_ref(),
        "3,14,15,92".as_ref(),
        "--top-k".as_ref(),
        "2".as_ref(),
        "--format".as_ref(),
        "json".as_ref(),
    ])
    .ok();
    let json: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(json["family"], "llama");
    assert_eq!(json["tokens"], serde_json::json!([3, 14, 15, 92]));
    let positions = json["positions"].as_array().unwrap();
    assert_eq!(positions.len(), 4);
    assert!(positions
        .iter()
        .all(|p| p["top"].as_array().unwrap().len() == 2));
    assert_eq!(positions[3]["next_token"], Value::Null);
    let losses: Vec<f64> = positions[..3]
        .iter()
        .map(|p| p["next_token_loss"].as_f64().unwrap())
        .collect();
    let mean = losses.iter().sum::<f64>() / 3.0;
    assert!((json["loss"].as_f64().unwrap() - mean).abs() < 1e-9);
    assert!((json["perplexity"].as_f64().unwrap() - mean.exp()).abs() < 1e-9);
    assert_eq!(
        json["residual_norms"].as_array().unwrap().len(),
        4,
        "embedding + 3 blocks"
    );

    let table = probe([
        "forward".as_ref(),
        model.as_os_str(),
        "--tokens".as_ref(),
        "3,14".as_ref(),
    ])
    .ok();
    assert!(
        table.contains("perplexity") && table.contains("block 2"),
        "{table}"
    );
}

#[test]
fn forward_refuses_what_it_cannot_run() {
    let llama = fixture("llama-tied-f32");
    probe([
        "forward".as_ref(),
        llama.as_os_str(),
        "--tokens".as_ref(),
        "3,96".as_ref(),
    ])
    .fails_with(&[
        "llama-tied-f32",
        "token id 96 is outside the vocabulary of 96",
    ]);
    probe([
        "forward".as_ref(),
        fixture("paramgolf-tied-f32").as_os_str(),
        "--tokens".as_ref(),
        "1".as_ref(),
    ])
    .fails_with(&[
        "paramgolf-tied-f32",
        "forward passes for the paramgolf family",
        "not supported",
    ]);
    probe([
        "forward".as_ref(),
        llama.as_os_str(),
        "--text".as_ref(),
        "hi".as_ref(),
    ])
    .fails_with(&["tokenizer.json", "--tokens"]);
    probe([
        "forward".as_ref(),
        llama.as_os_str(),
        "--tokens".as_ref(),
        "1".as_ref(),
        "--format".as_ref(),
        "csv".as_ref(),
    ])
    .fails_with(&["table or json"]);
    // A tokenizer.json that makes the tokenizers crate panic (found by
    // fuzzing) is one error line, not a crash.
    let dir = crate::util::tempdir();
    crate::util::copy_dir(&llama, dir.path());
    let crash = std::fs::read_dir(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/regressions/tokenizer_json"),
    )
    .unwrap()
    .next()
    .unwrap()
    .unwrap()
    .path();
    std::fs::copy(crash, dir.path().join("tokenizer.json")).unwrap();
    probe([
        "forward".as_ref(),
        dir.path().as_os_str(),
        "--text".as_ref(),
        "hi".as_ref(),
    ])
    .fails_with(&["tokenizer.json", "cannot load the tokenizer: malformed"]);
    // The CPU wheel has no CUDA provider: strict registration fails, it does
    // not fall back to the CPU.
    probe([
        "forward".as_ref(),
        llama.as_os_str(),
        "--tokens".as_ref(),
        "1".as_ref(),
        "--device".as_ref(),
        "cuda".as_ref(),
    ])
    .fails_with(&["cuda"]);
}

#[test]
fn a_missing_onnx_runtime_is_one_line_naming_the_fix() {
    let llama = fixture("llama-tied-f32");
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_probe"));
    command
        .args([
            "forward".as_ref(),
            llama.as_os_str(),
            "--tokens".as_ref(),
            "1".as_ref(),
        ])
        .env("ORT_DYLIB_PATH", "/nonexistent/libonnxruntime.so");
    let out = command.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("/nonexistent/libonnxruntime.so") && stderr.contains("cargo xtask ort"),
        "{stderr}"
    );
}

/// A real cdylib reaches the engine through the host table: residuals, the
/// logit lens, block selection and the loss agree with the library engine.
#[test]
fn plugins_run_the_engine_through_the_host_table() {
    let model = fixture("llama-tied-f32");
    let lib = crate::util::plugin_lib("probe-testkit");
    let dir = crate::util::tempdir();
    let run_testkit = |params: &[&str], out: &str| {
        let out = dir.path().join(out);
        let mut all = vec!["mode=forward"];
        all.extend(params);
        crate::util::run_plugin(
            lib.to_str().unwrap(),
            &model,
            &all,
            &["--out", out.to_str().unwrap(), "--quiet"],
        )
        .ok();
        crate::util::read_parquet(&out)
    };
    let table = run_testkit(&["tokens=3,14,15,92"], "all.parquet");
    let checkpoint = Checkpoint::open(&model).unwrap();
    let mut engine = Engine::open(&checkpoint, EngineOptions::default()).unwrap();
    let tokens = [3u32, 14, 15, 92];
    let trace = run(&mut engine, &tokens, everything());
    assert_eq!(table.height(), 4 * 4, "4 stages × 4 positions");
    let norms: Vec<f64> = table
        .column("residual_norm")
        .unwrap()
        .f64()
        .unwrap()
        .into_no_null_iter()
        .collect();
    let expected: Vec<f64> = trace
        .residuals
        .iter()
        .flat_map(|r| norms_of(r, trace.hidden))
        .collect();
    for (a, b) in norms.iter().zip(&expected) {
        assert!((a - b).abs() < 1e-9, "{a} vs {b}");
    }
    let loss = table.column("loss").unwrap().f64().unwrap().get(0).unwrap();
    assert!((loss - trace.loss().unwrap()).abs() < 1e-12);
    // Five copies in one `forward_batch` call, every other one from a raw
    // start residual, give what the single run gives.
    let batched = run_testkit(&["tokens=3,14,15,92", "batch=5"], "batch.parquet");
    let diff = batched.column("batch_max_diff").unwrap().f64().unwrap();
    assert!(diff.get(0).unwrap() < 1e-5, "{diff:?}");
    // The lens at the last stage is the model's own prediction.
    let logits = trace.logits.as_ref().unwrap();
    let tops: Vec<i64> = table
        .column("lens_top1")
        .unwrap()
        .i64()
        .unwrap()
        .into_no_null_iter()
        .collect();
    for p in 0..4 {
        let own =
            probe::forward::summary::top_k(&logits[p * trace.vocab..(p + 1) * trace.vocab], 1)[0].0;
        assert_eq!(tops[12 + p], own as i64);
    }
    // Two blocks in another order: three stages.
    let reordered = run_testkit(&["tokens=3,14,15,92", "blocks=2,0"], "reordered.parquet");
    assert_eq!(reordered.height(), 3 * 4);
    let again = engine
        .run(&Request {
            tokens: &tokens,
            blocks: Some(&[2, 0]),
            capture: Capture {
                residuals: true,
                ..Capture::default()
            },
            ..Request::default()
        })
        .unwrap();
    let last: Vec<f64> = reordered
        .column("residual_norm")
        .unwrap()
        .f64()
        .unwrap()
        .into_no_null_iter()
        .skip(8)
        .collect();
    for (a, b) in last.iter().zip(norms_of(&again.output, again.hidden)) {
        assert!((a - b).abs() < 1e-9);
    }
    // Engine errors reach the user as the plugin's failure, in one line.
    crate::util::run_plugin(
        lib.to_str().unwrap(),
        &model,
        &["mode=forward", "tokens=3,999"],
        &[],
    )
    .fails_with(&["testkit", "token id 999 is outside the vocabulary of 96"]);
    crate::util::run_plugin(
        lib.to_str().unwrap(),
        &fixture("bert-f32"),
        &["mode=forward"],
        &[],
    )
    .fails_with(&["bert-f32", "no output embedding"]);
}

fn norms_of(matrix: &[f32], hidden: usize) -> Vec<f64> {
    norms(matrix, hidden)
}
