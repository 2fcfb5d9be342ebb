//! A plugin for probe's own tests. With `mode=ok` it lists every 2-D tensor
//! with its Frobenius norm (one work item per tensor, so `--shard` splits
//! it); the other modes misbehave on purpose.

use probe_sdk::prelude::*;

struct Testkit;

fn matrices(host: &Host) -> Result<Vec<TensorInfo>, PluginError> {
    Ok(host
        .tensors()?
        .into_iter()
        .filter(|t| {
            t.shape.len() == 2 && matches!(t.dtype.as_str(), "F32" | "F16" | "BF16" | "F64")
        })
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
                &["ok", "error", "panic", "segfault", "abort"],
                "ok",
                "how to behave",
            ),
            ParamSpec::new(
                "scale",
                ParamKind::Float,
                Some("1.0"),
                "multiply every norm by this",
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
            "segfault" => unsafe {
                // Deliberate: only ever run under --isolate in the tests.
                std::ptr::null_mut::<u64>().write_volatile(1);
            },
            "abort" => std::process::abort(),
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
            roles.push(info.role.clone());
            norms.push(norm * scale);
            host.progress(done as u64 + 1, items.len() as u64, &info.name);
        }
        Ok(df!("tensor" => names, "layer" => layers, "role" => roles, "frobenius" => norms)?)
    }
}

export_plugin!(Testkit);
