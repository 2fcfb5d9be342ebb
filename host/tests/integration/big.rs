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

fn write_sparse_model(dir: &Path) -> u64 {
    let per_shard = LAYERS / SHARDS;
    let mut weight_map = serde_json::Map::new();
    let mut total = 0u64;
    for shard in 0..SHARDS {
        let file_name = format!("model-{:05}-of-{SHARDS:05}.safetensors", shard + 1);
        let mut header = serde_json::Map::new();
        let mut offset = 0usize;
        let mut first_q = None;
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
                let bytes = rows * cols * 2;
                if layer == 0 && role == "self_attn.q_proj" {
                    first_q = Some(offset);
                }
                header.insert(
                    name.clone(),
                    serde_json::json!({"dtype": "BF16", "shape": [rows, cols], "data_offsets": [offset, offset + bytes]}),
                );
                weight_map.insert(name, file_name.clone().into());
                offset += bytes;
            }
        }
        let mut json = serde_json::to_vec(&header).unwrap();
        while json.len() % 8 != 0 {
            json.push(b' ');
        }
        let mut file = std::fs::File::create(dir.join(&file_name)).unwrap();
        file.write_all(&(json.len() as u64).to_le_bytes()).unwrap();
        file.write_all(&json).unwrap();
        let start = 8 + json.len() as u64;
        file.set_len(start + offset as u64).unwrap();
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
        total += start + offset as u64;
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
