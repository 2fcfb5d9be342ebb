//! A checkpoint far bigger than the machine's memory: sparse shards (made with
//! `set_len`, so they take no disk) holding 80 blocks of a 4096-wide model,
//! about 34 GB of BF16. `probe inspect` must read headers only, and spectral's
//! power method on a few matrices must keep resident memory bounded — the
//! weights are mapped, never loaded as a whole.

use std::io::{Seek, SeekFrom, Write};
use std::path::Path;

use crate::util::tempdir;

const LAYERS: usize = 80;
const HIDDEN: usize = 4096;
const FFN: usize = 14336;
const SHARDS: usize = 8;

/// Run probe and return (exit code, stdout, stderr, peak RSS in MB).
///
/// The peak comes from a small Python parent's RUSAGE_CHILDREN: a child
/// forked from this (large, multi-threaded) test process would inherit the
/// test's own peak in `ru_maxrss`, so probe is started from a fresh process.
fn run_measured(args: &[&std::ffi::OsStr]) -> (Option<i32>, String, String, f64) {
    const SCRIPT: &str = "import resource, subprocess, sys\n\
r = subprocess.run(sys.argv[1:])\n\
sys.stderr.write('\\npeak_rss_kb=%d\\n' % resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n\
sys.exit(r.returncode)\n";
    let out = std::process::Command::new("python3")
        .args(["-c", SCRIPT])
        .arg(env!("CARGO_BIN_EXE_probe"))
        .args(args)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let (probe_stderr, peak) = stderr
        .rsplit_once("peak_rss_kb=")
        .expect("the helper reports the peak");
    let kb: f64 = peak.trim().parse().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        probe_stderr.trim().to_string(),
        kb / 1024.0,
    )
}

/// A sparse BF16 shard at `path` holding `tensors` (name, shape): its
/// header, then `set_len` for the data, so it takes no disk. The open file,
/// where the data starts, each tensor's offset from there, and the file's
/// length.
fn write_sparse_shard(
    path: &Path,
    tensors: &[(String, Vec<usize>)],
) -> (std::fs::File, u64, Vec<usize>, u64) {
    let mut header = serde_json::Map::new();
    let mut offsets = Vec::with_capacity(tensors.len());
    let mut offset = 0usize;
    for (name, shape) in tensors {
        let bytes = shape.iter().product::<usize>() * 2;
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + bytes]}),
        );
        offsets.push(offset);
        offset += bytes;
    }
    let mut json = serde_json::to_vec(&header).unwrap();
    while json.len() % 8 != 0 {
        json.push(b' ');
    }
    let mut file = std::fs::File::create(path).unwrap();
    file.write_all(&(json.len() as u64).to_le_bytes()).unwrap();
    file.write_all(&json).unwrap();
    let start = 8 + json.len() as u64;
    file.set_len(start + offset as u64).unwrap();
    (file, start, offsets, start + offset as u64)
}

fn write_sparse_model(dir: &Path) -> u64 {
    let per_shard = LAYERS / SHARDS;
    let mut weight_map = serde_json::Map::new();
    let mut total = 0u64;
    for shard in 0..SHARDS {
        let file_name = format!("model-{:05}-of-{SHARDS:05}.safetensors", shard + 1);
        let mut tensors = Vec::new();
        for layer in shard * per_shard..(shard + 1) * per_shard {
            let matrices = [
                ("self_attn.q_proj", HIDDEN, HIDDEN),
                ("self_attn.k_proj", HIDDEN, HIDDEN),
                ("self_attn.v_proj", HIDDEN, HIDDEN),
                ("self_attn.o_proj", HIDDEN, HIDDEN),
                ("mlp.gate_proj", FFN, HIDDEN),
                ("mlp.up_proj", FFN, HIDDEN),
                ("mlp.down_proj", HIDDEN, FFN),
            ];
            for (role, rows, cols) in matrices {
                let name = format!("model.layers.{layer}.{role}.weight");
                weight_map.insert(name.clone(), file_name.clone().into());
                tensors.push((name, vec![rows, cols]));
            }
        }
        let (mut file, start, offsets, length) =
            write_sparse_shard(&dir.join(&file_name), &tensors);
        // Layer 0's q is the first tensor of the first shard.
        let first_q = (shard == 0).then_some(offsets[0]);
        if let Some(q) = first_q {
            // Real values for the one matrix analysed: a deterministic
            // pseudo-random BF16 pattern (the rest stays sparse zeros).
            let mut state = 0x9e3779b97f4a7c15u64;
            let values: Vec<u8> = (0..HIDDEN * HIDDEN)
                .flat_map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    let v = ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.05;
                    half::bf16::from_f32(v).to_le_bytes()
                })
                .collect();
            file.seek(SeekFrom::Start(start + q as u64)).unwrap();
            file.write_all(&values).unwrap();
        }
        total += length;
    }
    let index = serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    let config = serde_json::json!({
        "model_type": "llama", "hidden_size": HIDDEN, "intermediate_size": FFN,
        "num_hidden_layers": LAYERS, "num_attention_heads": 32, "num_key_value_heads": 32,
        "vocab_size": 32000
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    total
}

#[test]
fn a_checkpoint_bigger_than_memory_is_read_in_bounded_memory() {
    let dir = tempdir();
    let total = write_sparse_model(dir.path());
    assert!(
        total > 30 << 30,
        "the model must dwarf the machine's memory: {total} bytes"
    );

    let (code, stdout, stderr, rss) = run_measured(&[
        "inspect".as_ref(),
        dir.path().as_os_str(),
        "--format".as_ref(),
        "json".as_ref(),
    ]);
    assert_eq!(code, Some(0), "{stderr}");
    let json: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(json["num_layers"], 80);
    assert_eq!(json["tensors"].as_array().unwrap().len(), 80 * 7);
    // Headers only: tens of megabytes at most, whatever the model's size.
    assert!(rss < 64.0, "inspect peak RSS {rss:.0} MB");

    let out = dir.path().join("spectral.parquet");
    let plugin = crate::util::plugin_lib("probe-plugin-spectral");
    // Spectral's power method with these extra parameters, measured.
    let spectral = |params: &[&str]| {
        let mut args: Vec<&std::ffi::OsStr> = vec![
            "run".as_ref(),
            "--plugin".as_ref(),
            plugin.as_os_str(),
            dir.path().as_os_str(),
            "--param".as_ref(),
            "method=power".as_ref(),
            "--quiet".as_ref(),
            "--out".as_ref(),
            out.as_os_str(),
        ];
        for param in params {
            args.extend([std::ffi::OsStr::new("--param"), std::ffi::OsStr::new(param)]);
        }
        run_measured(&args)
    };
    let (code, _, stderr, rss) = spectral(&["layers=0", "roles=q"]);
    assert_eq!(code, Some(0), "{stderr}");
    let table = crate::util::read_parquet(&out);
    assert_eq!(table.height(), 1);
    // Uniform values on ±0.025: σ = 0.05/√12 per entry, so ‖W‖_F ≈ 4096·σ and,
    // for a square random matrix, σ_max ≈ 2√4096·σ (the Marchenko–Pastur edge).
    let entry_std = 0.05 / 12f64.sqrt();
    let value = |name: &str| table.column(name).unwrap().f64().unwrap().get(0).unwrap();
    let frobenius = value("frobenius");
    assert!(
        (frobenius / (4096.0 * entry_std) - 1.0).abs() < 0.01,
        "{frobenius}"
    );
    let sigma = value("sigma_max_power");
    assert!(
        (sigma / (2.0 * 64.0 * entry_std) - 1.0).abs() < 0.05,
        "{sigma}"
    );
    // One 4096² matrix as f32 (64 MB) and its f64 Gram matrix (128 MB) are
    // the working set; the 34 GB model is never resident.
    assert!(
        rss < 1024.0,
        "spectral peak RSS {rss:.0} MB for a {:.0} GB model",
        total as f64 / 1e9
    );

    // Six whole blocks (42 matrices, 2.8 GB of BF16): each matrix's file
    // pages are given back once it is converted, so mapped pages do not pile
    // up block after block (before: every page read stayed resident).
    let (code, _, stderr, rss) = spectral(&["layers=0-5"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(crate::util::read_parquet(&out).height(), 6 * 7);
    assert!(
        rss < 1024.0,
        "spectral over six blocks: peak RSS {rss:.0} MB, file pages included"
    );
}

/// A Llama-3-70B-shaped checkpoint in sparse BF16 shards (no disk used):
/// 8192 wide, 64 query and 8 key/value heads, an MLP of 28672, a vocabulary
/// of 128256 and an untied head — every tensor a forward pass reads, all
/// zeros but the embedding rows of the first ids (so the pass carries a
/// signal). `layers` blocks, one shard each, plus one for the embedding,
/// the final norm and the head.
fn write_sparse_70b(dir: &Path, layers: usize) -> u64 {
    const WIDE: usize = 8192;
    const MLP: usize = 28672;
    const VOCAB: usize = 128256;
    const KV: usize = 1024;
    let mut weight_map = serde_json::Map::new();
    let mut total = 0u64;
    let mut shard = |file_name: String, tensors: Vec<(String, Vec<usize>)>, filled: usize| {
        for (name, _) in &tensors {
            weight_map.insert(name.clone(), file_name.clone().into());
        }
        let (mut file, _, _, length) = write_sparse_shard(&dir.join(&file_name), &tensors);
        // The first tensor's first `filled` values: small nonzero numbers.
        let values: Vec<u8> = (0..filled)
            .flat_map(|i| half::bf16::from_f32(((i % 17) as f32 - 8.0) * 0.01).to_le_bytes())
            .collect();
        file.write_all(&values).unwrap();
        total += length;
    };
    let outer = vec![
        ("model.embed_tokens.weight".to_string(), vec![VOCAB, WIDE]),
        ("lm_head.weight".to_string(), vec![VOCAB, WIDE]),
        ("model.norm.weight".to_string(), vec![WIDE]),
    ];
    shard("model-outer.safetensors".into(), outer, 16 * WIDE);
    for layer in 0..layers {
        let name = |part: &str| format!("model.layers.{layer}.{part}.weight");
        let tensors = vec![
            (name("input_layernorm"), vec![WIDE]),
            (name("post_attention_layernorm"), vec![WIDE]),
            (name("self_attn.q_proj"), vec![WIDE, WIDE]),
            (name("self_attn.k_proj"), vec![KV, WIDE]),
            (name("self_attn.v_proj"), vec![KV, WIDE]),
            (name("self_attn.o_proj"), vec![WIDE, WIDE]),
            (name("mlp.gate_proj"), vec![MLP, WIDE]),
            (name("mlp.up_proj"), vec![MLP, WIDE]),
            (name("mlp.down_proj"), vec![WIDE, MLP]),
        ];
        shard(format!("model-{layer:05}.safetensors"), tensors, 0);
    }
    let index = serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    let config = serde_json::json!({
        "model_type": "llama", "hidden_size": WIDE, "intermediate_size": MLP,
        "num_hidden_layers": layers, "num_attention_heads": 64, "num_key_value_heads": 8,
        "vocab_size": VOCAB, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "tie_word_embeddings": false
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    total
}

/// `probe forward` on four tokens of a 70B-shaped checkpoint with these
/// extra arguments: (loss, weight counters, peak RSS in MB).
fn forward_70b(dir: &Path, extra: &[&str]) -> (f64, serde_json::Value, f64) {
    let mut args: Vec<&std::ffi::OsStr> = vec![
        "forward".as_ref(),
        dir.as_os_str(),
        "--tokens".as_ref(),
        "1,5,2,7".as_ref(),
        "-f".as_ref(),
        "json".as_ref(),
    ];
    args.extend(extra.iter().map(std::ffi::OsStr::new));
    let (code, stdout, stderr, rss) = run_measured(&args);
    assert_eq!(code, Some(0), "{stderr}");
    let json: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    (json["loss"].as_f64().unwrap(), json["weights"].clone(), rss)
}

#[test]
fn a_forward_pass_over_70b_shaped_blocks_streams_through_the_budget() {
    // Two blocks of the full width (6.8 GB of f32 weights, the head 4.2 GB
    // more): a 3 GB budget holds one half-block or a tile of the head at a
    // time, so everything streams — blocks as attention then MLP, the head
    // in tiles, the embedding by rows.
    let dir = tempdir();
    write_sparse_70b(dir.path(), 2);
    let (loss, weights, rss) = forward_70b(dir.path(), &["--memory-budget", "3GB"]);
    // All-zero blocks and head: every logit is 0, the loss is ln(vocab).
    assert!((loss - (128256f64).ln()).abs() < 1e-4, "{loss}");
    let peak = weights["peak_converted_bytes"].as_u64().unwrap();
    assert!(peak <= 3_000_000_000, "{weights}");
    assert!(weights["evictions"].as_u64().unwrap() > 0, "{weights}");
    // The converted weights and everything else (mapped pages, ONNX
    // Runtime's buffers) under the budget plus 1.5 GB.
    assert!(rss < 4500.0, "peak RSS {rss:.0} MB under a 3 GB budget");
}

/// The whole model: 80 blocks, 137 GB of BF16, four tokens, the
/// default budget. Minutes on 2 cores (every weight is converted once), so
/// run by hand: `cargo test -p probe --test integration -- --ignored
/// seventy_b`; BENCHMARKS.md records its time and peak.
#[test]
#[ignore]
fn seventy_b_forward_in_bounded_memory() {
    let dir = tempdir();
    let total = write_sparse_70b(dir.path(), 80);
    let start = std::time::Instant::now();
    let (loss, weights, rss) = forward_70b(dir.path(), &[]);
    eprintln!(
        "70B-shaped forward, {:.0} GB of BF16: {:.0} s, peak RSS {rss:.0} MB, loss {loss}, weights {weights}",
        total as f64 / 1e9,
        start.elapsed().as_secs_f64()
    );
    assert!(rss < 8192.0, "peak RSS {rss:.0} MB");
}
