//! `cargo xtask bench …`: timings against a named reference in the same run,
//! appended to BENCHMARKS.md with the machine and date. Never run by tests.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// Time `probe inspect` on a 1 GB checkpoint against the least any reader
/// must do: Python reading the 8-byte length and parsing the JSON header.
pub fn inspect(root: &Path) -> Result<()> {
    let probe = build_release(root)?;
    let dir = root.join("target/bench");
    std::fs::create_dir_all(&dir)?;
    let file = dir.join("llama-1gb.safetensors");
    let size = write_sparse_checkpoint(&file)?;

    let runs = 20;
    let probe_run = time_command(runs, || {
        let mut c = Command::new(&probe);
        c.args(["inspect", "--format", "json"]).arg(&file);
        c
    })?;
    let python_run = time_command(runs, || {
        let mut c = Command::new("python3");
        c.args([
            "-c",
            "import json,struct,sys\nf=open(sys.argv[1],'rb');n=struct.unpack('<Q',f.read(8))[0];h=json.loads(f.read(n));print(len(h))",
        ])
        .arg(&file);
        c
    })?;
    let ratio = python_run.median.as_secs_f64() / probe_run.median.as_secs_f64();
    let line = format!(
        "| {} | {} | inspect, {:.2} GB BF16 checkpoint ({} runs) | probe {:.1} ms, peak RSS {:.1} MB | python3 json header read {:.1} ms, peak RSS {:.1} MB | {:.2}× |",
        today(),
        machine(),
        size as f64 / 1e9,
        runs,
        probe_run.median.as_secs_f64() * 1e3,
        probe_run.peak_rss_kb as f64 / 1024.0,
        python_run.median.as_secs_f64() * 1e3,
        python_run.peak_rss_kb as f64 / 1024.0,
        ratio,
    );
    println!("{line}");
    record(root, &line)?;
    Ok(())
}

/// Build probe and every built-in plugin (each bench runs its plugin by
/// path from `target/release/`).
pub fn build_release(root: &Path) -> Result<PathBuf> {
    let status = Command::new(env!("CARGO"))
        .args(["build", "--release", "--package", "probe"])
        .args(
            crate::BUILTIN_PLUGINS
                .iter()
                .flat_map(|name| ["--package", name]),
        )
        .current_dir(root)
        .status()?;
    if !status.success() {
        bail!("cargo build --release failed");
    }
    Ok(root.join("target/release/probe"))
}

/// A llama-shaped BF16 checkpoint of about 1 GB. The data region is sparse
/// (`set_len`): inspect never reads it, and the file still has its full size.
fn write_sparse_checkpoint(path: &Path) -> Result<u64> {
    let (hidden, ffn, vocab, layers) = (2048usize, 5632usize, 32000usize, 10usize);
    let mut tensors: Vec<(String, Vec<usize>)> = vec![
        ("model.embed_tokens.weight".into(), vec![vocab, hidden]),
        ("model.norm.weight".into(), vec![hidden]),
        ("lm_head.weight".into(), vec![vocab, hidden]),
    ];
    for i in 0..layers {
        let p = format!("model.layers.{i}");
        for (name, shape) in [
            ("self_attn.q_proj", vec![hidden, hidden]),
            ("self_attn.k_proj", vec![hidden / 8, hidden]),
            ("self_attn.v_proj", vec![hidden / 8, hidden]),
            ("self_attn.o_proj", vec![hidden, hidden]),
            ("mlp.gate_proj", vec![ffn, hidden]),
            ("mlp.up_proj", vec![ffn, hidden]),
            ("mlp.down_proj", vec![hidden, ffn]),
            ("input_layernorm", vec![hidden]),
            ("post_attention_layernorm", vec![hidden]),
        ] {
            tensors.push((format!("{p}.{name}.weight"), shape));
        }
    }
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (name, shape) in &tensors {
        let bytes = shape.iter().product::<usize>() * 2;
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    let mut json = serde_json::to_vec(&header)?;
    json.resize(json.len().div_ceil(8) * 8, b' ');
    let mut file = std::fs::File::create(path)?;
    file.write_all(&(json.len() as u64).to_le_bytes())?;
    file.write_all(&json)?;
    let total = (8 + json.len() + offset) as u64;
    file.set_len(total)?;
    Ok(total)
}

/// Time `probe run --plugin spectral` on SmolLM2-135M against numpy's
/// LAPACK SVD (`np.linalg.svd(W.astype(float64), compute_uv=False)`) of the
/// same matrices, both on the same number of threads.
pub fn spectral(root: &Path) -> Result<()> {
    let probe = build_release(root)?;
    let plugin = root.join("target/release/libprobe_plugin_spectral.so");
    let model = crate::models::models_dir(root).join(crate::models::SMOLLM2);
    if !model.join(".complete").exists() {
        bail!("{} is missing: run `cargo xtask models`", model.display());
    }
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .to_string();
    let dir = root.join("target/bench");
    std::fs::create_dir_all(&dir)?;
    let out = dir.join("spectral.parquet");
    let runs = 3;
    let mut rows = Vec::new();
    let routes: [(&str, &[&str]); 3] = [
        (
            "default route (f64 Gram + eigenvalues)",
            &["algorithm=gram"],
        ),
        ("f32 SVD", &["algorithm=svd", "precision=f32"]),
        ("f64 SVD", &["algorithm=svd", "precision=f64"]),
    ];
    for (route, params) in routes {
        let timing = time_command(runs, || {
            let mut c = Command::new(&probe);
            c.args(["run", "--quiet", "--plugin"])
                .arg(&plugin)
                .arg(&model);
            for param in params {
                c.args(["--param", param]);
            }
            c.args(["--param", &format!("threads={threads}"), "--out"]);
            c.arg(&out);
            c
        })?;
        rows.push((route, timing));
    }
    let script = root.join("plugins/spectral/reference/spectral_reference.py");
    let site = numpy_site(root)?;
    let numpy = time_command(runs, || {
        let mut c = python(&site, &threads);
        c.arg(&script).arg(&model).arg("--time");
        c
    })?;
    // WeightWatcher itself, the same columns (its own Python, installed
    // apart: it pulls pandas, scipy, scikit-learn and matplotlib).
    let ww_site = root.join(".cache/ww");
    if !ww_site.join("weightwatcher").exists() {
        let status = Command::new("python3")
            .args(["-m", "pip", "install", "--quiet", "--target"])
            .arg(&ww_site)
            .arg(WEIGHTWATCHER)
            .status()?;
        if !status.success() {
            bail!("pip install {WEIGHTWATCHER} failed");
        }
    }
    let ww_script = root.join("plugins/spectral/reference/weightwatcher_reference.py");
    let weightwatcher = time_command(1, || {
        let mut c = python(&ww_site, &threads);
        c.arg(&ww_script)
            .arg(&model)
            .arg(dir.join("weightwatcher.csv"));
        c
    })
    .context("WeightWatcher failed (above)")?;
    let default_route = &rows[0].1;
    let line = format!(
        "| {} | {} | spectral against WeightWatcher 0.7.7 (`analyze()`, its defaults, scipy LAPACK f64 SVDs; its columns alpha … warning, which probe's table has under the same names), SmolLM2-135M (211 matrices), {threads} threads | probe default route {:.2} s (whole run, median of {runs}), peak RSS {:.0} MB | WeightWatcher {:.2} s (whole script, 1 run), peak RSS {:.0} MB | {:.2}× |",
        today(),
        machine(),
        default_route.median.as_secs_f64(),
        default_route.peak_rss_kb as f64 / 1024.0,
        weightwatcher.median.as_secs_f64(),
        weightwatcher.peak_rss_kb as f64 / 1024.0,
        weightwatcher.median.as_secs_f64() / default_route.median.as_secs_f64(),
    );
    println!("{line}");
    record(root, &line)?;
    for (route, timing) in rows {
        let line = format!(
            "| {} | {} | spectral, SmolLM2-135M (211 matrices), {route}, {threads} threads, median of {runs} | probe {:.2} s (whole run), peak RSS {:.0} MB | numpy LAPACK f64 SVDs alone {:.2} s (script {:.2} s), peak RSS {:.0} MB | {:.2}× |",
            today(),
            machine(),
            timing.median.as_secs_f64(),
            timing.peak_rss_kb as f64 / 1024.0,
            numpy.inner_seconds.unwrap_or(f64::NAN),
            numpy.median.as_secs_f64(),
            numpy.peak_rss_kb as f64 / 1024.0,
            numpy.inner_seconds.unwrap_or(numpy.median.as_secs_f64()) / timing.median.as_secs_f64(),
        );
        println!("{line}");
        record(root, &line)?;
    }
    Ok(())
}

/// `cargo xtask bench contrastive`: the contrastive plugin on SmolLM2 over
/// the whole built-in set (every group, chat template on), against an
/// independent numpy f64 computation of the same table
/// (`plugins/contrastive/reference/contrastive_reference.py`: its own
/// tokenization through the `tokenizers` package, its own forward pass and
/// measures) on the same threads, in the same run; the line records the
/// largest difference between the two tables as well as the times.
pub fn contrastive(root: &Path) -> Result<()> {
    let probe = build_release(root)?;
    let plugin = root.join("target/release/libprobe_plugin_contrastive.so");
    let model = crate::models::models_dir(root).join(crate::models::SMOLLM2);
    if !model.join(".complete").exists() {
        bail!("{} is missing: run `cargo xtask models`", model.display());
    }
    let site = root.join(".cache/py");
    reference_packages(&site)?;
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .to_string();
    let set = root.join("probes/contrastive.json");
    let groups = serde_json::from_slice::<serde_json::Value>(&std::fs::read(&set)?)?["groups"]
        .as_array()
        .map_or(0, Vec::len);
    let dir = root.join("target/bench");
    std::fs::create_dir_all(&dir)?;
    let out = dir.join("contrastive.csv");
    let runs = 3;
    let ours = time_command(runs, || {
        let mut c = Command::new(&probe);
        c.args(["run", "--quiet", "--threads", &threads, "--plugin"])
            .arg(&plugin)
            .arg(&model)
            .arg("--out")
            .arg(&out);
        c
    })?;
    let script = root.join("plugins/contrastive/reference/contrastive_reference.py");
    let reference = |extra: &[&std::ffi::OsStr]| -> Command {
        let mut c = python(&site, &threads);
        c.arg(&script).arg(&model).arg(&set).args(extra);
        c
    };
    let diff_path = dir.join("contrastive-diff.json");
    let numpy = time_command(1, || {
        reference(&[
            "--time".as_ref(),
            "--probe".as_ref(),
            out.as_os_str(),
            "--diff".as_ref(),
            diff_path.as_os_str(),
        ])
    })
    .context("the numpy reference failed or disagrees with probe's table (above)")?;
    let diff: serde_json::Value = serde_json::from_slice(&std::fs::read(&diff_path)?)?;
    let worst = |column: &str| diff["max_abs_diff"][column].as_f64().unwrap_or(f64::NAN);
    let line = format!(
        "| {} | {} | contrastive, SmolLM2-135M, the built-in set ({groups} groups, {} rows), chat template, {threads} threads, median of {runs} | probe {:.1} s (whole run), peak RSS {:.0} MB | numpy f64 reference (tokenizers, own forward and measures) {:.1} s (computation alone), peak RSS {:.0} MB; tables agree to cosine {:.1e}, distance {:.1e}, cka {:.1e}, kl {:.1e} nats (max abs) | {:.2}× |",
        today(),
        machine(),
        diff["rows"],
        ours.median.as_secs_f64(),
        ours.peak_rss_kb as f64 / 1024.0,
        numpy.inner_seconds.unwrap_or(f64::NAN),
        numpy.peak_rss_kb as f64 / 1024.0,
        worst("cosine"),
        worst("distance"),
        worst("cka"),
        worst("kl_ab").max(worst("kl_ba")),
        numpy.inner_seconds.unwrap_or(numpy.median.as_secs_f64()) / ours.median.as_secs_f64(),
    );
    println!("{line}");
    record(root, &line)
}

/// `cargo xtask bench studies`: the lens, knockout and swap plugins on
/// SmolLM2 over the built-in prompt set (the model's own greedy completions,
/// made by the host's key/value cache), each a whole `probe run`, against an
/// independent numpy f64 computation of the same tables
/// (`plugins/lens/reference/studies_reference.py`: its own forward pass,
/// lens and block orders over the exact token sequences probe ran) on the
/// same threads, in the same run. Swap runs on adjacent pairs (`max_gap=1`)
/// here: all 435 pairs take the numpy reference hours.
pub fn studies(root: &Path) -> Result<()> {
    let bench = PluginBench::open(root)?;
    let (model, site, threads, dir) = (&bench.model, &bench.site, &bench.threads, &bench.dir);
    let studies: [(&str, &[&str]); 3] =
        [("lens", &[]), ("knockout", &[]), ("swap", &["max_gap=1"])];
    // One run each: the three take minutes, and the numpy reference much longer.
    let mut ours = Vec::new();
    for (plugin, params) in studies {
        let out = dir.join(format!("{plugin}.csv"));
        let timing = bench.run(plugin, params, &out)?;
        ours.push((plugin, out, timing));
    }
    let script = root.join("plugins/lens/reference/studies_reference.py");
    let diff_path = dir.join("studies-diff.json");
    let numpy = time_command(1, || {
        let mut c = python(site, threads);
        c.arg(&script).arg(model).arg(dir.join("lens.tokens.csv"));
        for (plugin, out, _) in &ours {
            c.arg(format!("--{plugin}")).arg(out);
        }
        c.arg("--time").arg("--diff").arg(&diff_path);
        c
    })
    .context("the numpy reference failed (above)")?;
    let diff: serde_json::Value = serde_json::from_slice(&std::fs::read(&diff_path)?)?;
    let seconds = |part: &str| diff["seconds"][part].as_f64().unwrap_or(f64::NAN);
    let lens = &diff["lens"];
    let agreement = [
        format!(
            "target_prob {:.1e}, entropy {:.1e}, kl_to_final {:.1e} (max abs), {} of {} ranks and {} top-1 differ; generated tokens the f64 model's top-1: {} of {}",
            lens["max_abs_diff"]["target_prob"].as_f64().unwrap_or(f64::NAN),
            lens["max_abs_diff"]["entropy"].as_f64().unwrap_or(f64::NAN),
            lens["max_abs_diff"]["kl_to_final"].as_f64().unwrap_or(f64::NAN),
            lens["disagreements"]["target_rank"],
            lens["rows"],
            lens["disagreements"]["top1"],
            diff["scored_tokens_that_are_the_f64_top1"][0],
            diff["scored_tokens_that_are_the_f64_top1"][1],
        ),
        format!(
            "losses agree to {:.1e} nats",
            diff["knockout_max_abs_diff_loss"].as_f64().unwrap_or(f64::NAN)
        ),
        format!(
            "losses agree to {:.1e} nats",
            diff["swap_max_abs_diff_loss"].as_f64().unwrap_or(f64::NAN)
        ),
    ];
    let what = [
        "lens, SmolLM2-135M, the built-in prompt set (60 prompts, greedy completions of 16)",
        "knockout, SmolLM2-135M, the built-in prompt set, 30 single blocks",
        "swap, SmolLM2-135M, the built-in prompt set, 29 adjacent pairs (max_gap=1)",
    ];
    for (((plugin, _, timing), what), agreement) in ours.iter().zip(what).zip(agreement) {
        // The reference's share: its forward pass with every stage (which
        // each study needs) plus the study itself.
        let reference = seconds("forward") + seconds(plugin);
        let line = format!(
            "| {} | {} | {what}, {threads} threads, 1 run | probe {:.1} s (whole run, generation included), peak RSS {:.0} MB | numpy f64 reference over probe's token sequences {:.1} s (forward {:.1} s + {plugin} {:.1} s, no generation), peak RSS {:.0} MB (all three); {agreement} | {:.2}× |",
            today(),
            machine(),
            timing.median.as_secs_f64(),
            timing.peak_rss_kb as f64 / 1024.0,
            reference,
            seconds("forward"),
            seconds(plugin),
            numpy.peak_rss_kb as f64 / 1024.0,
            reference / timing.median.as_secs_f64(),
        );
        println!("{line}");
        record(root, &line)?;
    }
    Ok(())
}

/// `python3` with `site` on its path and its BLAS on `threads` threads, as
/// every reference runs.
fn python(site: &Path, threads: &str) -> Command {
    let mut c = Command::new("python3");
    c.env("PYTHONPATH", site);
    for var in ["OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"] {
        c.env(var, threads);
    }
    c
}

/// `.cache/py` with numpy in it (installed on first use), for PYTHONPATH.
fn numpy_site(root: &Path) -> Result<PathBuf> {
    let site = root.join(".cache/py");
    if !site.join("numpy").exists() {
        let status = Command::new("python3")
            .args(["-m", "pip", "install", "--quiet", "--target"])
            .arg(&site)
            .arg("numpy")
            .status()?;
        if !status.success() {
            bail!("pip install numpy failed");
        }
    }
    Ok(site)
}

/// What the SmolLM2 plugin benches share: the release build, the model,
/// numpy for the reference, the threads and the output folder.
struct PluginBench {
    root: PathBuf,
    probe: PathBuf,
    model: PathBuf,
    site: PathBuf,
    threads: String,
    dir: PathBuf,
}

impl PluginBench {
    fn open(root: &Path) -> Result<Self> {
        let probe = build_release(root)?;
        let model = crate::models::models_dir(root).join(crate::models::SMOLLM2);
        if !model.join(".complete").exists() {
            bail!("{} is missing: run `cargo xtask models`", model.display());
        }
        let site = numpy_site(root)?;
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .to_string();
        let dir = root.join("target/bench");
        std::fs::create_dir_all(&dir)?;
        Ok(Self {
            root: root.to_path_buf(),
            probe,
            model,
            site,
            threads,
            dir,
        })
    }

    /// One timed `probe run` of a built-in plugin on SmolLM2.
    fn run(&self, plugin: &str, params: &[&str], out: &Path) -> Result<Timing> {
        time_command(1, || {
            let mut c = Command::new(&self.probe);
            c.args(["run", "--quiet", "--threads", &self.threads, "--plugin"])
                .arg(
                    self.root
                        .join(format!("target/release/libprobe_plugin_{plugin}.so")),
                )
                .arg(&self.model)
                .args(params.iter().flat_map(|p| ["--param", p]))
                .arg("--out")
                .arg(out);
            c
        })
    }
}

/// `cargo xtask bench quant`: the quant plugin on SmolLM2 over the built-in
/// prompt set — the default run (`scope=block` at 2, 3, 4 and 8 bits with
/// the recipes), timed whole; and its 3-bit block rows, timed alone, against
/// the numpy f64 reference (`studies_reference.py --quant`: its own float32
/// rounding and forward pass over the exact token sequences, taken from a
/// lens run's `tokens` table) on the same threads, in the same run.
pub fn quant(root: &Path) -> Result<()> {
    let bench = PluginBench::open(root)?;
    let (model, site, threads, dir) = (&bench.model, &bench.site, &bench.threads, &bench.dir);
    let run = |plugin: &str, params: &[&str], out: &Path| bench.run(plugin, params, out);
    // The exact sequences (the same greedy completions quant generates).
    run("lens", &[], &dir.join("lens.csv"))?;
    let whole = run("quant", &[], &dir.join("quant.csv"))?;
    let three_bits = dir.join("quant-3bits.csv");
    let ours = run("quant", &["bits=3", "recipes=false"], &three_bits)?;
    let script = root.join("plugins/lens/reference/studies_reference.py");
    let diff_path = dir.join("quant-diff.json");
    let numpy = time_command(1, || {
        let mut c = python(site, threads);
        c.arg(&script)
            .arg(model)
            .arg(dir.join("lens.tokens.csv"))
            .arg("--quant")
            .arg(&three_bits)
            .arg("--time")
            .arg("--diff")
            .arg(&diff_path);
        c
    })
    .context("the numpy reference failed (above)")?;
    let diff: serde_json::Value = serde_json::from_slice(&std::fs::read(&diff_path)?)?;
    let seconds = |part: &str| diff["seconds"][part].as_f64().unwrap_or(f64::NAN);
    let reference = seconds("forward") + seconds("quant");
    let line = format!(
        "| {} | {} | quant, SmolLM2-135M, the built-in prompt set, scope=block: 30 blocks at 3 bits ({} rows), {threads} threads, 1 run; the default run (2, 3, 4, 8 bits and the recipes) took {:.1} s, peak RSS {:.0} MB | probe {:.1} s (whole run, generation included), peak RSS {:.0} MB | numpy f64 reference over probe's token sequences {:.1} s (forward {:.1} s + quant {:.1} s, no generation), peak RSS {:.0} MB; losses agree to {:.1e} nats | {:.2}× |",
        today(),
        machine(),
        diff["quant_rows"],
        whole.median.as_secs_f64(),
        whole.peak_rss_kb as f64 / 1024.0,
        ours.median.as_secs_f64(),
        ours.peak_rss_kb as f64 / 1024.0,
        reference,
        seconds("forward"),
        seconds("quant"),
        numpy.peak_rss_kb as f64 / 1024.0,
        diff["quant_max_abs_diff_loss"].as_f64().unwrap_or(f64::NAN),
        reference / ours.median.as_secs_f64(),
    );
    println!("{line}");
    record(root, &line)
}

/// `cargo xtask bench residual`: geometry, autopsy and linearity on SmolLM2
/// over the built-in prompt set, each timed whole, against the numpy f64
/// reference (`plugins/geometry/reference/residual_reference.py`: its own
/// forward pass over the exact token sequences of a lens run, its own
/// measures) on the same threads, in the same run. Linearity is compared on
/// four blocks (its default run over all 30 is timed too): the reference
/// draws its own random directions, so the gaps agree to their sampling
/// error and the update ratios exactly.
pub fn residual(root: &Path) -> Result<()> {
    let bench = PluginBench::open(root)?;
    let (model, site, threads, dir) = (&bench.model, &bench.site, &bench.threads, &bench.dir);
    let run = |plugin: &str, params: &[&str], out: &Path| bench.run(plugin, params, out);
    // The exact sequences (the same greedy completions every plugin generates).
    run("lens", &[], &dir.join("lens.csv"))?;
    let geometry = run("geometry", &[], &dir.join("geometry.csv"))?;
    let autopsy = run("autopsy", &[], &dir.join("autopsy.csv"))?;
    let linearity = run("linearity", &[], &dir.join("linearity.csv"))?;
    let four = dir.join("linearity-4.csv");
    let linearity_four = run("linearity", &["layers=0,10,20,29"], &four)?;
    let script = root.join("plugins/geometry/reference/residual_reference.py");
    let diff_path = dir.join("residual-diff.json");
    let numpy = time_command(1, || {
        let mut c = python(site, threads);
        c.arg(&script)
            .arg(model)
            .arg(dir.join("lens.tokens.csv"))
            .arg(root.join("probes/prompts.jsonl"))
            .arg("--geometry")
            .arg(dir.join("geometry.csv"))
            .arg("--autopsy")
            .arg(dir.join("autopsy.csv"))
            .arg("--linearity")
            .arg(&four)
            .arg("--time")
            .arg("--diff")
            .arg(&diff_path);
        c
    })
    .context("the numpy reference failed (above)")?;
    let diff: serde_json::Value = serde_json::from_slice(&std::fs::read(&diff_path)?)?;
    let seconds = |part: &str| diff["seconds"][part].as_f64().unwrap_or(f64::NAN);
    let worst = |table: &str| -> f64 {
        diff[table]
            .as_object()
            .map(|m| m.values().filter_map(|v| v.as_f64()).fold(0.0, f64::max))
            .unwrap_or(f64::NAN)
    };
    let rss = numpy.peak_rss_kb as f64 / 1024.0;
    let mut lines = Vec::new();
    for (plugin, timing, what) in [
        (
            "geometry",
            &geometry,
            "geometry, SmolLM2-135M, the built-in prompt set (917 scored tokens pooled), 31 layers",
        ),
        (
            "autopsy",
            &autopsy,
            "autopsy, SmolLM2-135M, the built-in prompt set (every position), 30 blocks",
        ),
    ] {
        let reference = seconds("forward") + seconds(plugin);
        lines.push(format!(
            "| {} | {} | {what}, {threads} threads, 1 run | probe {:.1} s (whole run, generation included), peak RSS {:.0} MB | numpy f64 reference over probe's token sequences {:.1} s (forward {:.1} s + {plugin} {:.1} s, no generation), peak RSS {rss:.0} MB (all three); every column agrees to {:.1e} (max relative) | {:.2}× |",
            today(),
            machine(),
            timing.median.as_secs_f64(),
            timing.peak_rss_kb as f64 / 1024.0,
            reference,
            seconds("forward"),
            seconds(plugin),
            worst(&format!("{plugin}_max_rel_diff")),
            reference / timing.median.as_secs_f64(),
        ));
    }
    let rel = &diff["linearity_max_rel_diff"];
    lines.push(format!(
        "| {} | {} | linearity, SmolLM2-135M, the built-in prompt set (sample=10), blocks 0, 10, 20, 29 × 3 parts ({} rows), defaults otherwise, {threads} threads, 1 run; the default run over all 30 blocks took {:.1} s, peak RSS {:.0} MB | probe {:.1} s (whole run, generation included), peak RSS {:.0} MB | numpy f64 reference over probe's token sequences, its own directions: {:.1} s (the sweep alone; its forward pass over the whole set, {:.1} s, not counted), peak RSS {rss:.0} MB (all three); update_ratio agrees to {:.1e}, gap to {:.1} % (largest difference {:.1} standard errors), amplification to {:.1} %, order to {:.3} | {:.2}× |",
        today(),
        machine(),
        diff["linearity_rows"],
        linearity.median.as_secs_f64(),
        linearity.peak_rss_kb as f64 / 1024.0,
        linearity_four.median.as_secs_f64(),
        linearity_four.peak_rss_kb as f64 / 1024.0,
        seconds("linearity"),
        seconds("forward"),
        rel["update_ratio"].as_f64().unwrap_or(f64::NAN),
        100.0 * rel["gap"].as_f64().unwrap_or(f64::NAN),
        diff["linearity_max_gap_z"].as_f64().unwrap_or(f64::NAN),
        100.0 * rel["amplification"].as_f64().unwrap_or(f64::NAN),
        diff["linearity_max_abs_diff_order"].as_f64().unwrap_or(f64::NAN),
        seconds("linearity") / linearity_four.median.as_secs_f64(),
    ));
    for line in lines {
        println!("{line}");
        record(root, &line)?;
    }
    Ok(())
}

/// The WeightWatcher release probe's spectral columns follow.
const WEIGHTWATCHER: &str = "weightwatcher==0.7.7";

/// Python packages the contrastive and patch references need besides numpy.
const REFERENCE_PACKAGES: [&str; 2] = ["tokenizers==0.23.3", "jinja2==3.1.6"];

/// Install [`REFERENCE_PACKAGES`] into `site` unless they are there.
fn reference_packages(site: &Path) -> Result<()> {
    if !site.join("tokenizers").exists() || !site.join("jinja2").exists() {
        let status = Command::new("python3")
            .args(["-m", "pip", "install", "--quiet", "--target"])
            .arg(site)
            .args(REFERENCE_PACKAGES)
            .status()?;
        if !status.success() {
            bail!("pip install {} failed", REFERENCE_PACKAGES.join(" "));
        }
    }
    Ok(())
}

/// `cargo xtask bench patch`: the patch plugin on SmolLM2 over the shipped
/// pair set — the default run (resid, attn and mlp at every layer and
/// position) and every head at the last position, each timed whole — and
/// both on every fourth pair against the numpy f64 reference
/// (`plugins/patch/reference/patch_reference.py`: its own tokenization,
/// forward passes and patches, the no-op patches skipped as probe skips
/// them) on the same threads, in the same run.
pub fn patch(root: &Path) -> Result<()> {
    let bench = PluginBench::open(root)?;
    reference_packages(&bench.site)?;
    let (model, site, threads, dir) = (&bench.model, &bench.site, &bench.threads, &bench.dir);
    let run = |params: &[&str], out: &Path| bench.run("patch", params, out);
    let heads = ["components=heads", "positions=last"];
    let whole = run(&[], &dir.join("patch.csv"))?;
    let whole_heads = run(&heads, &dir.join("patch-heads.csv"))?;
    let all_pairs = std::fs::read_to_string(root.join("probes/patching.jsonl"))?;
    let subset: Vec<&str> = all_pairs
        .lines()
        .filter(|l| !l.trim().is_empty())
        .step_by(4)
        .collect();
    let pairs = dir.join("patching-subset.jsonl");
    std::fs::write(&pairs, subset.join("\n") + "\n")?;
    let pairs_param = format!("pairs={}", pairs.display());
    let (part, part_heads) = (
        dir.join("patch-subset.csv"),
        dir.join("patch-subset-heads.csv"),
    );
    let ours = run(&[&pairs_param], &part)?;
    let ours_heads = run(&[&pairs_param, heads[0], heads[1]], &part_heads)?;
    let script = root.join("plugins/patch/reference/patch_reference.py");
    let diff_path = dir.join("patch-diff.json");
    let numpy = time_command(1, || {
        let mut c = python(site, threads);
        c.arg(&script)
            .arg(model)
            .arg(&pairs)
            .arg("--table")
            .arg(&part)
            .arg("--table")
            .arg(&part_heads)
            .arg("--diff")
            .arg(&diff_path);
        c
    })
    .context("the numpy reference failed (above)")?;
    let diff: serde_json::Value = serde_json::from_slice(&std::fs::read(&diff_path)?)?;
    let worst = |c: &str| diff["max_abs_diff"][c].as_f64().unwrap_or(f64::NAN);
    let reference = diff["seconds"]["patch"].as_f64().unwrap_or(f64::NAN);
    let probe_seconds = ours.median.as_secs_f64() + ours_heads.median.as_secs_f64();
    let line = format!(
        "| {} | {} | patch, SmolLM2-135M, every fourth pair of probes/patching.jsonl ({} pairs, {} rows): resid, attn, mlp at every layer and position, and every head at the last position, {threads} threads, 1 run each; on the whole set (38 pairs) the default run took {:.1} s, the heads at the last position {:.1} s, peak RSS {:.0} MB | probe {:.1} s (both runs whole: {:.1} s + {:.1} s), peak RSS {:.0} MB | numpy f64 reference (tokenizers, own forward passes and patches, no-op patches skipped) {:.1} s (computation alone), peak RSS {:.0} MB; ld agrees to {:.1e}, effect to {:.1e}, kl to {:.1e} (max abs) | {:.2}× |",
        today(),
        machine(),
        diff["pairs"],
        diff["rows"],
        whole.median.as_secs_f64(),
        whole_heads.median.as_secs_f64(),
        whole.peak_rss_kb.max(whole_heads.peak_rss_kb) as f64 / 1024.0,
        probe_seconds,
        ours.median.as_secs_f64(),
        ours_heads.median.as_secs_f64(),
        ours.peak_rss_kb.max(ours_heads.peak_rss_kb) as f64 / 1024.0,
        reference,
        numpy.peak_rss_kb as f64 / 1024.0,
        worst("ld"),
        worst("effect"),
        worst("kl"),
        reference / probe_seconds,
    );
    println!("{line}");
    record(root, &line)
}

/// `cargo xtask bench forward`: tokens per second of a full forward pass on
/// SmolLM2 with every block's residual captured, against llama.cpp (the
/// llama-cpp-python build in `.cache/llama`, when installed) on the same
/// token ids and threads, in the same run; probe's peak memory against the
/// checkpoint's f32 size; and the cost of streaming: SmolLM2 in BF16 under
/// `--memory-budget 64MB` against the same model with no budget.
pub fn forward(root: &Path) -> Result<()> {
    let probe = build_release(root)?;
    let model = crate::models::models_dir(root).join(crate::models::SMOLLM2);
    if !model.join(".complete").exists() {
        bail!("{} is missing: run `cargo xtask models`", model.display());
    }
    let reference: serde_json::Value = serde_json::from_slice(&std::fs::read(
        root.join("fixtures/reference/smollm2_llama_cpp.json"),
    )?)?;
    let ids: Vec<String> = reference["texts"]
        .as_array()
        .context("reference texts")?
        .iter()
        .flat_map(|t| t["tokens"].as_array().cloned().unwrap_or_default())
        .map(|t| t.to_string())
        .collect();
    let tokens = ids.join(",");
    let n = ids.len();
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .to_string();
    let (runs, passes) = (3, "5");
    let time_probe = |model: &Path, extra: &[&str]| {
        time_command(runs, || {
            let mut c = Command::new(&probe);
            c.arg("forward").arg(model);
            c.args([
                "--tokens",
                &tokens,
                "--threads",
                &threads,
                "--time-passes",
                passes,
            ]);
            c.args(extra);
            c
        })
    };
    let ours = time_probe(&model, &[])?;
    let ours_s = ours.inner_seconds.context("probe printed no timing")?;
    let f32_bytes = std::fs::metadata(model.join("model.safetensors"))?.len() as f64;
    let peak = ours.peak_rss_kb as f64 * 1024.0;
    if peak > 1.5 * f32_bytes {
        eprintln!("warning: peak memory is above 1.5× the checkpoint's f32 size");
    }
    let llama = root.join(".cache/llama");
    if llama.join("llama_cpp").exists() {
        let gguf = crate::models::models_dir(root)
            .join(crate::models::SMOLLM2_GGUF)
            .join("SmolLM2-135M-Instruct.Q4_1.gguf");
        let script = root.join("fixtures/reference/llama_cpp_reference.py");
        let theirs = time_command(runs, || {
            let mut c = Command::new("python3");
            c.arg(&script).arg(&gguf);
            c.args(["--time", &tokens, &threads, passes]);
            c.env("PYTHONPATH", &llama);
            c
        })?;
        let theirs_s = theirs
            .inner_seconds
            .context("llama.cpp printed no timing")?;
        let line = format!(
            "| {} | {} | forward, SmolLM2-135M, {n} tokens, logits at every position, {threads} threads, median pass of {passes} × {runs} runs | probe (ONNX Runtime, f32, every block's residual captured) {:.3} s = {:.0} tok/s, peak RSS {:.0} MB = {:.2}× the f32 checkpoint | llama.cpp (Q4_1 GGUF) {:.3} s = {:.0} tok/s, peak RSS {:.0} MB | {:.2}× |",
            today(),
            machine(),
            ours_s,
            n as f64 / ours_s,
            peak / 1048576.0,
            peak / f32_bytes,
            theirs_s,
            n as f64 / theirs_s,
            theirs.peak_rss_kb as f64 / 1024.0,
            theirs_s / ours_s,
        );
        println!("{line}");
        record(root, &line)?;
    } else {
        eprintln!(
            "llama.cpp is not installed, so no row against it (`pip install --target .cache/llama llama-cpp-python==0.3.36` builds it from source, ~8 minutes)"
        );
    }

    // The cost of streaming: BF16 weights converted on every pass through a
    // 64 MB budget, against the same model converted once and kept.
    let bf16 = root.join(".cache/bench/SmolLM2-135M-Instruct-bf16");
    if !bf16.join("model.safetensors").exists() {
        crate::models::run(
            Command::new(&probe)
                .arg("convert")
                .arg(&model)
                .args(["--dtype", "bf16", "--out"])
                .arg(&bf16),
        )?;
    }
    let kept = time_probe(&bf16, &["--memory-budget", "none"])?;
    let streamed = time_probe(&bf16, &["--memory-budget", "64MB"])?;
    let (kept_s, streamed_s) = (
        kept.inner_seconds.context("probe printed no timing")?,
        streamed.inner_seconds.context("probe printed no timing")?,
    );
    let line = format!(
        "| {} | {} | forward, SmolLM2-135M in BF16 (`probe convert --dtype bf16`), {n} tokens, logits at every position, {threads} threads, median pass of {passes} × {runs} runs after the first | probe `--memory-budget 64MB` (every block converted again each pass, the head in tiles) {:.3} s = {:.0} tok/s, peak RSS {:.0} MB | probe `--memory-budget none` (converted once, 538 MB kept) {:.3} s = {:.0} tok/s, peak RSS {:.0} MB | {:.2}× |",
        today(),
        machine(),
        streamed_s,
        n as f64 / streamed_s,
        streamed.peak_rss_kb as f64 / 1024.0,
        kept_s,
        n as f64 / kept_s,
        kept.peak_rss_kb as f64 / 1024.0,
        kept_s / streamed_s,
    );
    println!("{line}");
    record(root, &line)
}

/// What `cargo xtask bench shuffle` runs on.
pub enum ShuffleSubject {
    /// SmolLM2-135M (30 blocks, the model the pipeline was developed on):
    /// every method on seed 3.
    SmolLm2,
    /// Gemma 3 270M (18 blocks of two kinds, a model it was not developed
    /// on): the published pipeline and the default one on seed 3, then the
    /// default in both config forms.
    Gemma3,
}

/// What a [`ShuffleSubject`] is run as.
struct ShuffleSetup {
    /// The folder `cargo xtask models` fills (its `.complete` says it did).
    dir: PathBuf,
    /// The checkpoint `probe shuffle` reads: the folder, or a file in it.
    checkpoint: PathBuf,
    /// The model's name in the rows, and its blocks.
    name: &'static str,
    blocks: usize,
    /// The methods of the seed-3 table.
    methods: &'static str,
    /// The config forms the seeds run in.
    forms: &'static [&'static str],
}

impl ShuffleSubject {
    fn setup(&self, root: &Path) -> ShuffleSetup {
        let models = crate::models::models_dir(root);
        match self {
            ShuffleSubject::SmolLm2 => {
                let dir = models.join(crate::models::SMOLLM2);
                ShuffleSetup {
                    checkpoint: dir.clone(),
                    dir,
                    name: "SmolLM2-135M",
                    blocks: 30,
                    methods: "all",
                    forms: &["moved"],
                }
            }
            ShuffleSubject::Gemma3 => {
                let dir = models.join(crate::models::GEMMA3_270M);
                ShuffleSetup {
                    checkpoint: dir.join("gemma-3-270m-q4_k_m.gguf"),
                    dir,
                    name: "Gemma 3 270M",
                    blocks: 18,
                    // flow_insert alone would take most of an hour at 262 k
                    // vocabulary; the weight-only methods say little here.
                    methods: "loss_bubble,flow_repair",
                    forms: &["moved", "kept"],
                }
            }
        }
    }
}

/// `cargo xtask bench shuffle`: methods of the shuffle plugin on the
/// subject shuffled with seed 3 — Kendall τ, accuracy, mean |displacement|
/// and seconds — against the published 100 % pipeline (adjacent swaps by
/// loss, seeded by activation flow: our `loss_bubble`) timed in the same run;
/// then the default pipeline on `seeds` seeds in each config form,
/// counting exact recoveries.
pub fn shuffle(root: &Path, subject: ShuffleSubject, seeds: u64) -> Result<()> {
    let probe = build_release(root)?;
    let plugin = root.join("target/release/libprobe_plugin_shuffle.so");
    let ShuffleSetup {
        dir: model_dir,
        checkpoint: model,
        name,
        blocks,
        methods,
        forms,
    } = subject.setup(root);
    if !model_dir.join(".complete").exists() {
        bail!(
            "{} is missing: run `cargo xtask models`",
            model_dir.display()
        );
    }
    let dir = root.join("target/bench/shuffle");
    std::fs::create_dir_all(&dir)?;
    // One run of the plugin on a freshly shuffled copy: its methods table and
    // the wall time of the whole `probe run` (loading included).
    // Per method: τ, accuracy, mean |displacement|, seconds.
    type Methods = Vec<(String, [f64; 4])>;
    let run = |seed: u64, form: &str, methods: &str| -> Result<(Methods, f64)> {
        let shuffled = dir.join(format!("seed-{seed}-{form}"));
        let status = Command::new(&probe)
            .args([
                "shuffle",
                "--seed",
                &seed.to_string(),
                "--config",
                form,
                "--out",
            ])
            .arg(&shuffled)
            .arg(&model)
            .stdout(Stdio::null())
            .status()?;
        if !status.success() {
            bail!("probe shuffle --seed {seed} failed");
        }
        let out = dir.join("order.csv");
        let started = Instant::now();
        let status = Command::new(&probe)
            .args(["run", "--quiet", "--plugin"])
            .arg(&plugin)
            .arg(&shuffled)
            .args(["--param", &format!("methods={methods}"), "--out"])
            .arg(&out)
            .status()?;
        let wall = started.elapsed().as_secs_f64();
        if !status.success() {
            bail!("the shuffle plugin failed on seed {seed}");
        }
        let table = std::fs::read_to_string(dir.join("order.methods.csv"))?;
        let rows = table
            .lines()
            .skip(1)
            .map(|line| {
                let cells: Vec<&str> = line.split(',').collect();
                let number = |i: usize| {
                    cells
                        .get(i)
                        .and_then(|c| c.parse().ok())
                        .unwrap_or(f64::NAN)
                };
                (
                    cells[0].to_string(),
                    [number(1), number(2), number(3), number(4)],
                )
            })
            .collect();
        std::fs::remove_dir_all(&shuffled)?;
        Ok((rows, wall))
    };
    let (table, _) = run(3, "moved", methods)?;
    let reference = table
        .iter()
        .find(|(m, _)| m == "loss_bubble")
        .map(|(_, v)| v[3])
        .context("the methods table has no loss_bubble row")?;
    for (method, [tau, accuracy, displacement, seconds]) in &table {
        let line = format!(
            "| {} | {} | shuffle, {name} ({blocks} blocks, seed 3), `{method}` | τ {tau:.3}, accuracy {:.1} %, mean \\|d\\| {displacement:.2}, {seconds:.2} s | published pipeline (`loss_bubble`: adjacent swaps by loss, seeded by flow) {reference:.2} s | {:.2}× |",
            today(),
            machine(),
            accuracy * 100.0,
            reference / seconds,
        );
        println!("{line}");
        record(root, &line)?;
    }
    for form in forms {
        let mut exact = 0;
        let (mut times, mut walls) = (Vec::new(), Vec::new());
        for seed in 1..=seeds {
            let (rows, wall) = run(seed, form, "flow_repair")?;
            let [_, accuracy, _, seconds] = rows.first().context("no methods row")?.1;
            exact += usize::from(accuracy == 1.0);
            times.push(seconds);
            walls.push(wall);
        }
        let median = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
        };
        let (median, wall) = (median(&mut times), median(&mut walls));
        let slowest = times.last().copied().unwrap_or(f64::NAN);
        let config = match forms.len() {
            1 => String::new(),
            _ => format!(", config {form}"),
        };
        let line = format!(
            "| {} | {} | shuffle, {name}, default pipeline (`flow_repair`) on seeds 1–{seeds}{config} | exact on {exact} of {seeds}, median {median:.2} s (slowest {slowest:.2} s; whole `probe run` {wall:.2} s) | published pipeline (`loss_bubble`, seed 3) {reference:.2} s | {:.2}× |",
            today(),
            machine(),
            reference / median,
        );
        println!("{line}");
        record(root, &line)?;
    }
    Ok(())
}

struct Timing {
    median: Duration,
    peak_rss_kb: i64,
    /// What the command printed as its own timing (seconds), median.
    inner_seconds: Option<f64>,
}

fn time_command(runs: usize, make: impl Fn() -> Command) -> Result<Timing> {
    let mut times = Vec::with_capacity(runs);
    let mut inner = Vec::new();
    let mut peak = 0;
    for _ in 0..runs {
        let start = Instant::now();
        let mut child = make()
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting the benchmarked command")?;
        let mut printed = String::new();
        if let Some(mut stdout) = child.stdout.take() {
            std::io::Read::read_to_string(&mut stdout, &mut printed)?;
        }
        let (status, rss) = wait_with_rusage(child)?;
        times.push(start.elapsed());
        if !status {
            bail!("benchmarked command failed");
        }
        if let Ok(seconds) = printed.trim().parse::<f64>() {
            inner.push(seconds);
        }
        peak = peak.max(rss);
    }
    times.sort();
    inner.sort_by(f64::total_cmp);
    Ok(Timing {
        median: times[runs / 2],
        peak_rss_kb: peak,
        inner_seconds: (inner.len() == runs).then(|| inner[runs / 2]),
    })
}

/// Wait for a child and read its own peak resident set (kB) from wait4.
fn wait_with_rusage(child: std::process::Child) -> Result<(bool, i64)> {
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: rusage is plain data (integers) for which all zeroes is valid.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: pid is our own child; status and usage are valid places to write.
    let waited = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    if waited != pid {
        bail!("wait4 failed: {}", std::io::Error::last_os_error());
    }
    std::mem::forget(child);
    Ok((
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        usage.ru_maxrss,
    ))
}

pub fn today() -> String {
    let out = Command::new("date").arg("+%Y-%m-%d").output();
    out.ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown date".into())
}

pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{cpu}, {cores} cores")
}

/// Append a row to BENCHMARKS.md's results table.
fn record(root: &Path, line: &str) -> Result<()> {
    let path = root.join("BENCHMARKS.md");
    let mut file = std::fs::OpenOptions::new().append(true).open(&path)?;
    writeln!(file, "{line}")?;
    Ok(())
}
