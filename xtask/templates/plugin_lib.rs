//! The `{{name}}` probe plugin: one row per 2-D weight matrix with its
//! Frobenius norm and mean absolute value. Change `run` to measure what you
//! need; `probe plugins info {{name}}` shows the parameters below.

use probe_sdk::prelude::*;

struct {{type_name}};

impl Plugin for {{type_name}} {
    const NAME: &'static str = "{{name}}";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const SUMMARY: &'static str = "Frobenius norm and mean |w| of every 2-D weight";
    const DESCRIPTION: &'static str = "A starting point made by `cargo xtask new-plugin`.";

    fn params() -> Vec<ParamSpec> {
        // A `roles` parameter is checked by the SDK before `run`: a role the
        // model lacks is an error naming the parameter, not an empty table.
        vec![ParamSpec::roles(
            "roles",
            &[],
            "only these roles (q,k,v,o,gate,up,down,embed,lm_head,…); all by default",
        )]
    }

    /// One work item per matrix, so `probe run --shard I/N` can split the work.
    fn work_items(host: &Host, params: &Params) -> Result<usize, PluginError> {
        Ok(matrices(host, params)?.len())
    }

    fn run(host: &Host, params: &Params, items: &[usize]) -> Result<DataFrame, PluginError> {
        let matrices = matrices(host, params)?;
        let (mut names, mut layers, mut roles, mut norms, mut means) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (done, &item) in items.iter().enumerate() {
            host.check_cancelled()?;
            let info = &matrices[item];
            let values = host.tensor_f32(info.index)?;
            let sum_sq: f64 = values.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
            let sum_abs: f64 = values.iter().map(|&v| f64::from(v).abs()).sum();
            names.push(info.name.clone());
            layers.push(info.layer.map(|l| l as i64));
            roles.push(info.role_name());
            norms.push(sum_sq.sqrt());
            means.push(sum_abs / values.len().max(1) as f64);
            host.progress(done as u64 + 1, items.len() as u64, &info.name);
        }
        Ok(df!(
            "tensor" => names,
            "layer" => layers,
            "role" => roles,
            "frobenius" => norms,
            "mean_abs" => means,
        )?)
    }
}

/// The 2-D floating-point tensors, filtered by the `roles` parameter.
fn matrices(host: &Host, params: &Params) -> Result<Vec<TensorInfo>, PluginError> {
    // `None` when the user did not give `roles`: every role.
    let roles: Option<Vec<Role>> = params.roles("roles");
    Ok(host
        .tensors()?
        .into_iter()
        .filter(|t| t.shape.len() == 2 && t.dtype.is_float())
        .filter(|t| roles.as_ref().is_none_or(|r| r.contains(&t.role)))
        .collect())
}

export_plugin!({{type_name}});
