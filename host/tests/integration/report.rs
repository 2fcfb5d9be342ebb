//! `probe report` on every plugin's output: charts checked by their content
//! (kind, labels, number of cells, bars and points), and the page opened in
//! headless Chromium to check that every chart is drawn.

use std::path::{Path, PathBuf};

use crate::util::{copy_dir, fixture, plugin_lib, probe, run_plugin, tempdir};

#[derive(Debug)]
struct Figure {
    kind: String,
    marks: usize,
    svg: String,
    title: String,
    attributes: String,
}

impl Figure {
    fn count(&self, element: &str) -> usize {
        self.svg.matches(&format!("<{element}")).count()
    }

    /// The texts drawn in the chart (labels, titles, legends).
    fn texts(&self) -> Vec<String> {
        self.svg
            .split("<text")
            .skip(1)
            .filter_map(|t| {
                t.split_once('>').map(|(_, rest)| {
                    rest.split("</text>")
                        .next()
                        .unwrap_or("")
                        .trim()
                        .to_string()
                })
            })
            .filter(|t| !t.is_empty())
            .collect()
    }
}

fn figures(html: &str) -> Vec<Figure> {
    html.split("<figure class=\"chart\"")
        .skip(1)
        .map(|chunk| {
            let (attributes, rest) = chunk.split_once('>').unwrap();
            let attr = |name: &str| {
                let key = format!("{name}=\"");
                let start = attributes.find(&key).map(|i| i + key.len()).unwrap_or(0);
                attributes[start..]
                    .split('"')
                    .next()
                    .unwrap_or("")
                    .to_string()
            };
            let body = rest.split("</figure>").next().unwrap();
            Figure {
                kind: attr("data-kind"),
                marks: attr("data-marks").parse().unwrap(),
                title: body
                    .split("<figcaption>")
                    .nth(1)
                    .unwrap()
                    .split("</figcaption>")
                    .next()
                    .unwrap()
                    .to_string(),
                svg: body.to_string(),
                attributes: attributes.to_string(),
            }
        })
        .collect()
}

fn report(results: &[&Path], dir: &Path) -> Vec<Figure> {
    let html = dir.join("report.html");
    let mut args: Vec<&std::ffi::OsStr> = vec!["report".as_ref()];
    args.extend(results.iter().map(|p| p.as_os_str()));
    args.extend(["-o".as_ref(), html.as_os_str()]);
    probe(args).ok();
    figures(&std::fs::read_to_string(&html).unwrap())
}

#[test]
fn spectral_report_has_heatmap_role_bars_and_singular_value_curves() {
    let dir = tempdir();
    let out = crate::util::run_plugin_to(
        "probe-plugin-spectral",
        &fixture("llama-tied-f32"),
        &["singular_values=true"],
        &dir.path().join("s.parquet"),
    );
    let figs = report(&[&out], dir.path());
    let kinds: Vec<&str> = figs.iter().map(|f| f.kind.as_str()).collect();
    assert_eq!(kinds, ["heatmap", "bars", "lines"]);

    // 3 layers × 7 roles, one rectangle per cell (plus the background).
    let heat = &figs[0];
    assert_eq!(heat.marks, 21);
    assert_eq!(heat.count("rect"), 21 + 1);
    assert!(heat.title.starts_with("pr_rank_ratio by layer and role"));
    let texts = heat.texts();
    for label in [
        "q", "k", "v", "o", "gate", "up", "down", "0", "1", "2", "layer", "role",
    ] {
        assert!(
            texts.iter().any(|t| t == label),
            "heat map lacks {label}: {texts:?}"
        );
    }

    // One bar per role, the tied embedding included.
    let bars = &figs[1];
    assert_eq!(bars.marks, 8);
    assert_eq!(bars.count("rect"), 8 + 1);
    assert!(bars.texts().iter().any(|t| t == "embed"));

    // σ curves of the middle block's 7 matrices: min(rows, cols) points each.
    let curves = &figs[2];
    assert_eq!(curves.marks, 32 + 16 + 16 + 32 + 32 + 32 + 32);
    assert_eq!(curves.count("circle"), curves.marks);
    assert!(curves.title.contains("layer 1"));

    // Another metric on request.
    let html = dir.path().join("erank.html");
    probe([
        "report".as_ref(),
        out.as_os_str(),
        "-o".as_ref(),
        html.as_os_str(),
        "--metric".as_ref(),
        "erank".as_ref(),
    ])
    .ok();
    let figs = figures(&std::fs::read_to_string(html).unwrap());
    assert!(figs[0].title.starts_with("erank by layer and role"));
}

#[test]
fn vshape_report_has_stacked_bars_and_a_run_over_training() {
    let dir = tempdir();
    let out = crate::util::run_plugin_to(
        "probe-plugin-vshape",
        &fixture("paramgolf-tied-f32"),
        &[],
        &dir.path().join("v.parquet"),
    );
    let figs = report(&[&out], dir.path());
    assert_eq!(figs.len(), 1);
    let bars = &figs[0];
    assert_eq!(bars.kind, "bars");
    // 4 blocks × (attention, MLP); background, legend box and border, 2 swatches.
    assert_eq!(bars.marks, 8);
    assert_eq!(bars.count("rect"), 8 + 1 + 2 + 2);
    let texts = bars.texts();
    for label in [
        "0",
        "1",
        "2",
        "3",
        "attention (eff_attn)",
        "MLP (eff_mlp)",
        "block",
    ] {
        assert!(texts.iter().any(|t| t == label), "lacks {label}: {texts:?}");
    }

    // A run of two checkpoints: spectral gets its metric over training.
    let run = dir.path().join("run");
    copy_dir(&fixture("llama-tied-f32"), &run.join("step-100"));
    copy_dir(&fixture("llama-tied-f32"), &run.join("step-200"));
    let out = crate::util::run_plugin_to(
        "probe-plugin-spectral",
        &run,
        &[],
        &dir.path().join("run.parquet"),
    );
    let figs = report(&[&out], dir.path());
    let over = figs
        .iter()
        .find(|f| f.title.contains("over 2 checkpoints"))
        .expect("over-training chart");
    assert_eq!(over.kind, "lines");
    assert_eq!(over.marks, 8 * 2, "8 roles × 2 checkpoints");
}

#[test]
fn other_plugins_get_a_metric_by_layer_and_run_writes_the_report_too() {
    let dir = tempdir();
    let html = dir.path().join("t.html");
    let out = dir.path().join("t.parquet");
    run_plugin(
        &plugin_lib("probe-testkit").display().to_string(),
        &fixture("llama-tied-f32"),
        &[],
        &[
            "--out",
            out.to_str().unwrap(),
            "--quiet",
            "--report",
            html.to_str().unwrap(),
        ],
    )
    .ok();
    let figs = figures(&std::fs::read_to_string(&html).unwrap());
    assert_eq!(figs.len(), 1);
    assert_eq!(figs[0].kind, "lines");
    assert_eq!(figs[0].title, "frobenius by layer");
    assert_eq!(figs[0].marks, 3, "mean per layer, 3 layers");

    // PNGs beside the page, one per chart.
    let png = dir.path().join("png");
    probe([
        "report".as_ref(),
        out.as_os_str(),
        "-o".as_ref(),
        html.as_os_str(),
        "--png".as_ref(),
        png.as_os_str(),
    ])
    .ok();
    let files: Vec<_> = std::fs::read_dir(&png).unwrap().collect();
    assert_eq!(files.len(), 1);
    let bytes = std::fs::read(files[0].as_ref().unwrap().path()).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");

    probe([
        "report".as_ref(),
        dir.path().join("missing.parquet").as_os_str(),
        "-o".as_ref(),
        html.as_os_str(),
    ])
    .fails_with(&["missing.parquet"]);
}

/// Debian's Chromium, as `.ci/run` installs it.
fn chromium() -> Option<PathBuf> {
    if std::env::var_os("PROBE_SKIP_BROWSER").is_some_and(|v| v == "1") {
        eprintln!("skipping the browser check: PROBE_SKIP_BROWSER=1");
        return None;
    }
    let path =
        PathBuf::from(std::env::var_os("CHROMIUM").unwrap_or_else(|| "/usr/bin/chromium".into()));
    assert!(
        path.exists(),
        "{} is missing: `apt-get install chromium` (or set PROBE_SKIP_BROWSER=1)",
        path.display()
    );
    Some(path)
}

#[test]
fn every_chart_is_drawn_in_headless_chromium() {
    let Some(browser) = chromium() else {
        return;
    };
    let dir = tempdir();
    let s = crate::util::run_plugin_to(
        "probe-plugin-spectral",
        &fixture("gemma3-tied-f32"),
        &["singular_values=true"],
        &dir.path().join("s.parquet"),
    );
    let v = crate::util::run_plugin_to(
        "probe-plugin-vshape",
        &fixture("paramgolf-banked-bf16"),
        &[],
        &dir.path().join("v.parquet"),
    );
    let figs = report(&[&s, &v], dir.path());
    assert_eq!(figs.len(), 4);
    let profile = dir.path().join("chromium-profile");
    let out = std::process::Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--virtual-time-budget=5000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg("--dump-dom")
        .arg(format!(
            "file://{}",
            dir.path().join("report.html").display()
        ))
        .output()
        .expect("chromium runs");
    let dom = String::from_utf8_lossy(&out.stdout);
    let drawn = figures(&dom);
    assert_eq!(
        drawn.len(),
        4,
        "chromium's DOM:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for fig in &drawn {
        assert!(
            fig.attributes.contains("data-drawn=\"yes\""),
            "{} not drawn: {}",
            fig.title,
            fig.attributes
        );
        let elements: usize = fig
            .attributes
            .split("data-elements=\"")
            .nth(1)
            .unwrap()
            .split('"')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert!(
            elements > fig.marks,
            "{}: {elements} SVG elements for {} marks",
            fig.title,
            fig.marks
        );
    }
}

#[test]
fn shuffle_report_plots_recovered_against_true_position_per_method() {
    let dir = tempdir();
    let shuffled = dir.path().join("shuffled");
    probe([
        "shuffle".as_ref(),
        fixture("llama-sharded-f16").as_os_str(),
        "--seed".as_ref(),
        "2".as_ref(),
        "--out".as_ref(),
        shuffled.as_os_str(),
    ])
    .ok();
    let out = crate::util::run_plugin_to(
        "probe-plugin-shuffle",
        &shuffled,
        &["methods=weight_stats,cosine"],
        &dir.path().join("order.parquet"),
    );
    let figs = report(&[&out], dir.path());
    assert_eq!(figs.len(), 1);
    let scatter = &figs[0];
    assert_eq!(scatter.kind, "scatter");
    assert_eq!(scatter.marks, 2 * 4, "4 blocks × 2 methods");
    assert_eq!(scatter.count("circle"), 8);
    let texts = scatter.texts();
    for label in [
        "weight_stats",
        "cosine",
        "true position",
        "recovered position",
    ] {
        assert!(texts.iter().any(|t| t == label), "lacks {label}: {texts:?}");
    }
}

#[test]
fn lens_report_has_a_heat_map_a_crystallization_histogram_and_kl_curves() {
    let dir = tempdir();
    let model = crate::util::fixture_with_tokenizer(dir.path());
    let set = dir.path().join("prompts.jsonl");
    std::fs::write(&set, crate::lens::FIXTURE_SET).unwrap();
    let out = crate::util::run_plugin_to(
        "probe-plugin-lens",
        &model,
        &[&format!("prompts={}", set.display()), "completion_tokens=5"],
        &dir.path().join("lens.parquet"),
    );
    let figs = report(&[&out], dir.path());
    let kinds: Vec<&str> = figs.iter().map(|f| f.kind.as_str()).collect();
    assert_eq!(kinds, ["heatmap", "bars", "lines", "lines"]);
    // Prompt 0 ("the cat sat on the" + "mat ."): 2 scored positions × 4
    // layers (the embedding and 3 blocks).
    assert_eq!(figs[0].marks, 8);
    assert!(figs[0].title.contains("prompt 0"));
    // Layers −1 … 2 on the histogram, one stack per category.
    let texts = figs[1].texts();
    for label in ["-1", "0", "1", "2", "facts", "weather"] {
        assert!(
            texts.iter().any(|t| t == label),
            "histogram lacks {label}: {texts:?}"
        );
    }
    // The KL curve leaves out the last layer (0 on a log axis); the top-1
    // share has every layer.
    assert_eq!(figs[2].marks, 3);
    assert_eq!(figs[3].marks, 4);
}

#[test]
fn knockout_report_has_ratios_by_block_and_a_synergy_heat_map() {
    let dir = tempdir();
    let model = crate::util::fixture_with_tokenizer(dir.path());
    let set = dir.path().join("prompts.jsonl");
    std::fs::write(&set, crate::lens::FIXTURE_SET).unwrap();
    let out = crate::util::run_plugin_to(
        "probe-plugin-knockout",
        &model,
        &[
            &format!("prompts={}", set.display()),
            "completion_tokens=3",
            "pairs=true",
        ],
        &dir.path().join("knockout.parquet"),
    );
    let figs = report(&[&out], dir.path());
    let kinds: Vec<&str> = figs.iter().map(|f| f.kind.as_str()).collect();
    assert_eq!(kinds, ["lines", "heatmap"]);
    // One point per block of the 3-block fixture; pairs (0,1), (0,2), (1,2)
    // fill 3 of the 3 × 3 cells.
    assert_eq!(figs[0].marks, 3);
    assert_eq!(figs[1].marks, 3);
}

#[test]
fn swap_report_is_a_triangle_of_loss_increases() {
    let dir = tempdir();
    let model = crate::util::fixture_with_tokenizer(dir.path());
    let set = dir.path().join("prompts.jsonl");
    std::fs::write(&set, crate::knockout::SET).unwrap();
    let out = crate::util::run_plugin_to(
        "probe-plugin-swap",
        &model,
        &[&format!("prompts={}", set.display())],
        &dir.path().join("swap.parquet"),
    );
    let figs = report(&[&out], dir.path());
    assert_eq!(figs.len(), 1);
    assert_eq!(figs[0].kind, "heatmap");
    // 3 blocks: the pairs (0,1), (0,2), (1,2).
    assert_eq!(figs[0].marks, 3);
    assert!(figs[0].title.contains("swapped"));
}

#[test]
fn quant_report_is_a_block_by_bits_and_a_role_by_block_heat_map() {
    let dir = tempdir();
    let model = crate::util::fixture_with_tokenizer(dir.path());
    let set = dir.path().join("prompts.jsonl");
    std::fs::write(&set, crate::knockout::SET).unwrap();
    let out = crate::util::run_plugin_to(
        "probe-plugin-quant",
        &model,
        &[
            &format!("prompts={}", set.display()),
            "bits=2,4",
            "scope=both",
            "recipes=false",
        ],
        &dir.path().join("quant.parquet"),
    );
    let figs = report(&[&out], dir.path());
    let kinds: Vec<&str> = figs.iter().map(|f| f.kind.as_str()).collect();
    assert_eq!(kinds, ["heatmap", "heatmap"]);
    // 3 blocks × 2 widths; then 7 matrices (q k v o gate up down) × 3 blocks at 4 bits.
    assert_eq!(figs[0].marks, 6);
    assert_eq!(figs[1].marks, 21);
    assert!(figs[1].title.contains("4 bits"), "{}", figs[1].title);
}

#[test]
fn geometry_report_has_each_metric_by_layer() {
    let dir = tempdir();
    let model = crate::util::fixture_with_tokenizer(dir.path());
    let set = dir.path().join("prompts.jsonl");
    std::fs::write(&set, crate::knockout::SET).unwrap();
    let out = crate::util::run_plugin_to(
        "probe-plugin-geometry",
        &model,
        &[&format!("prompts={}", set.display())],
        &dir.path().join("geometry.parquet"),
    );
    let figs = report(&[&out], dir.path());
    let kinds: Vec<&str> = figs.iter().map(|f| f.kind.as_str()).collect();
    assert_eq!(kinds, ["lines"; 6]);
    // The embedding and 3 blocks: 4 points a line; two lines of isotropy.
    assert_eq!(figs[0].marks, 4);
    assert_eq!(figs[5].marks, 8);
    assert!(figs[5].title.contains("centred"), "{}", figs[5].title);
}

#[test]
fn autopsy_report_has_each_health_metric_by_block() {
    let dir = tempdir();
    let model = crate::util::fixture_with_tokenizer(dir.path());
    let set = dir.path().join("prompts.jsonl");
    std::fs::write(&set, crate::knockout::SET).unwrap();
    let out = crate::util::run_plugin_to(
        "probe-plugin-autopsy",
        &model,
        &[&format!("prompts={}", set.display())],
        &dir.path().join("autopsy.parquet"),
    );
    let figs = report(&[&out], dir.path());
    assert_eq!(figs.len(), 7);
    assert!(figs.iter().all(|f| f.kind == "lines" && f.marks == 3));
    assert!(
        figs[0].title.contains("attention entropy"),
        "{}",
        figs[0].title
    );
}

#[test]
fn linearity_report_has_the_gap_profile_with_a_line_per_part() {
    let dir = tempdir();
    let model = crate::util::fixture_with_tokenizer(dir.path());
    let set = dir.path().join("prompts.jsonl");
    std::fs::write(&set, crate::knockout::SET).unwrap();
    let out = crate::util::run_plugin_to(
        "probe-plugin-linearity",
        &model,
        &[
            &format!("prompts={}", set.display()),
            "directions=2",
            "sweep_directions=2",
        ],
        &dir.path().join("linearity.parquet"),
    );
    let figs = report(&[&out], dir.path());
    // 3 blocks × 3 parts, one line per part.
    assert_eq!(figs.len(), 4);
    assert!(figs.iter().all(|f| f.kind == "lines" && f.marks == 9));
    assert!(
        figs[0].title.contains("gap") && figs[0].title.contains("ε = 0.05"),
        "{}",
        figs[0].title
    );
    let texts = figs[0].texts();
    for part in ["block", "attention", "mlp"] {
        assert!(texts.iter().any(|t| t == part), "{part}: {texts:?}");
    }
}

#[test]
fn patch_report_is_a_block_by_position_heat_map_per_component() {
    let dir = tempdir();
    let model = crate::util::fixture_with_tokenizer(dir.path());
    let pairs = dir.path().join("pairs.jsonl");
    std::fs::write(
        &pairs,
        "{\"clean\": \"the cat sat on the\", \"corrupt\": \"the day sat on the\", \"answer\": \"mat\", \"wrong\": \"cold\"}\n",
    )
    .unwrap();
    let out = crate::util::run_plugin_to(
        "probe-plugin-patch",
        &model,
        &[
            &format!("pairs={}", pairs.display()),
            "components=resid,mlp,heads",
            "min_gap=0",
        ],
        &dir.path().join("patch.parquet"),
    );
    let figs = report(&[&out], dir.path());
    let kinds: Vec<&str> = figs.iter().map(|f| f.kind.as_str()).collect();
    assert_eq!(kinds, ["heatmap", "heatmap", "heatmap"]);
    // 3 blocks × 5 positions; 3 blocks × 4 heads at the last position.
    assert_eq!(figs[0].marks, 15);
    assert!(figs[1].title.contains("mlp"), "{}", figs[1].title);
    assert_eq!(figs[2].marks, 12);
    assert!(figs[2].title.contains("head"), "{}", figs[2].title);
}
