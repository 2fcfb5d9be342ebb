//! A plugin for probe's own tests. With `mode=ok` it lists every 2-D tensor
//! with its Frobenius norm (one work item per tensor, so `--shard` splits
//! it); `mode=forward` runs the model through the host's forward engine and
//! reports the residual norm and logit-lens top-1 per stage and position;
//! `mode=run_info` reports how forward passes run (device, threads) and the
//! host's ABI; the other modes misbehave on purpose.

use probe_sdk::prelude::*;

struct Testkit;

fn matrices(host: &Host) -> Result<Vec<TensorInfo>, PluginError> {
    Ok(host
        .tensors()?
        .into_iter()
        .filter(|t| t.shape.len() == 2 && t.dtype.is_float())
        .collect())
}

impl Plugin for Testkit {
    const NAME: &'static str = "testkit";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const SUMMARY: &'static str =
        "Frobenius norms of 2-D tensors; misbehaves on request (for tests)";
    const DESCRIPTION: &'static str = "Used by probe's tests to check the plugin boundary.";

    fn params() -> Vec<ParamSpec> {
        vec![
            ParamSpec::choice(
                "mode",
                &["ok", "forward", "run_info", "error", "panic", "segfault", "abort"],
                "ok",
                "how to behave",
            ),
            ParamSpec::new(
                "scale",
                ParamKind::Float,
                Some("1.0"),
                "multiply every norm by this",
            ),
            ParamSpec::new(
                "tokens",
                ParamKind::Str,
                Some("3,14,15,92"),
                "token ids for mode=forward",
            ),
            ParamSpec::new(
                "blocks",
                ParamKind::Str,
                Some(""),
                "blocks to run in order for mode=forward (empty: all)",
            ),
            ParamSpec::new(
                "batch",
                ParamKind::Int,
                Some("1"),
                "mode=forward: also run the request as this many copies in one batch (every other one from the embedding's output passed as its start) and report the largest difference to the single run in `batch_max_diff`",
            ),
        ]
    }

    fn work_items(host: &Host, _params: &Params) -> Result<usize, PluginError> {
        Ok(matrices(host)?.len())
    }

    fn run(host: &Host, params: &Params, items: &[usize]) -> Result<DataFrame, PluginError> {
        match params.str("mode")? {
            "error" => return Err("asked to fail".into()),
            "panic" => panic!("asked to panic"),
            // SAFETY: not sound, deliberately: a crash for the tests of
            // --isolate, which only ever run this mode in a child process.
            "segfault" => unsafe {
                std::ptr::null_mut::<u64>().write_volatile(1);
            },
            "abort" => std::process::abort(),
            "forward" => return forward(host, params),
            "run_info" => {
                let info = host.run_info()?;
                return Ok(df!(
                    "device" => [info.device],
                    "threads" => [info.threads as i64],
                    "host_abi" => [host.abi().to_string()]
                )?);
            }
            _ => {}
        }
        let scale = params.float("scale")?;
        let all = matrices(host)?;
        let mut names = Vec::new();
        let mut layers = Vec::new();
        let mut roles = Vec::new();
        let mut norms = Vec::new();
        for (done, &item) in items.iter().enumerate() {
            host.check_cancelled()?;
            let info = all.get(item).ok_or("work item out of range")?;
            let values = host.tensor_f32(info.index)?;
            let norm = values
                .iter()
                .map(|&v| (v as f64) * (v as f64))
                .sum::<f64>()
                .sqrt();
            names.push(info.name.clone());
            layers.push(info.layer.map(|l| l as i64));
            roles.push(info.role_name());
            norms.push(norm * scale);
            host.progress(done as u64 + 1, items.len() as u64, &info.name);
        }
        Ok(df!("tensor" => names, "layer" => layers, "role" => roles, "frobenius" => norms)?)
    }
}

fn ids(text: &str) -> Result<Vec<usize>, PluginError> {
    text.split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| {
            s.trim()
                .parse()
                .map_err(|_| PluginError::from(format!("`{s}` is not a number")))
        })
        .collect()
}

/// Residual norm and logit-lens top-1 at every stage and position.
fn forward(host: &Host, params: &Params) -> Result<DataFrame, PluginError> {
    let tokens: Vec<u32> = ids(params.str("tokens")?)?
        .into_iter()
        .map(|t| t as u32)
        .collect();
    let blocks = ids(params.str("blocks")?)?;
    let out = host.forward(&ForwardRequest {
        tokens,
        blocks: (!blocks.is_empty()).then_some(blocks),
        residuals: true,
        logits: true,
        ..ForwardRequest::default()
    })?;
    let batch_max_diff = batch_difference(host, params, &out)?;
    let t = out.tokens.len();
    let (mut stages, mut positions, mut norms, mut tops, mut top_logits) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (stage, residual) in out.residuals.iter().enumerate() {
        let logits = host.lens(residual, t)?;
        for p in 0..t {
            let row = &residual[p * out.hidden..(p + 1) * out.hidden];
            let lens = &logits[p * out.vocab..(p + 1) * out.vocab];
            let (top, logit) =
                lens.iter()
                    .enumerate()
                    .fold((0, f32::NEG_INFINITY), |best, (i, &l)| {
                        if l > best.1 {
                            (i, l)
                        } else {
                            best
                        }
                    });
            stages.push(stage as i64);
            positions.push(p as i64);
            norms.push(row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>().sqrt());
            tops.push(top as i64);
            top_logits.push(logit as f64);
        }
    }
    let loss = vec![out.loss.unwrap_or(f64::NAN); stages.len()];
    let batch_max_diff = vec![batch_max_diff; stages.len()];
    Ok(df!(
        "stage" => stages,
        "position" => positions,
        "residual_norm" => norms,
        "lens_top1" => tops,
        "lens_top1_logit" => top_logits,
        "loss" => loss,
        "batch_max_diff" => batch_max_diff
    )?)
}

/// Run `single`'s request again as `batch` copies in one call; the largest
/// difference of any copy's residuals or loss from the single run.
fn batch_difference(
    host: &Host,
    params: &Params,
    single: &ForwardOutput,
) -> Result<f64, PluginError> {
    let copies = params.int("batch")?.max(1) as usize;
    let embedding = &single.residuals[0];
    let requests: Vec<ForwardRequest> = (0..copies)
        .map(|i| ForwardRequest {
            tokens: single.tokens.clone(),
            blocks: Some(single.blocks.clone()),
            residuals: true,
            loss: true,
            start: (i % 2 == 1).then(|| embedding.clone()),
            ..ForwardRequest::default()
        })
        .collect();
    let mut worst = 0.0f64;
    for out in host.forward_batch(&requests)? {
        if out.residuals.len() != single.residuals.len() {
            return Err("a batched copy ran a different number of blocks".into());
        }
        for (a, b) in out.residuals.iter().zip(&single.residuals) {
            for (x, y) in a.iter().zip(b) {
                worst = worst.max(((x - y) as f64).abs());
            }
        }
        let (a, b) = (
            out.loss.unwrap_or(f64::NAN),
            single.loss.unwrap_or(f64::NAN),
        );
        worst = worst.max((a - b).abs());
    }
    Ok(worst)
}

export_plugin!(Testkit);
