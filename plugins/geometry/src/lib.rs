//! `geometry`: the shape of the residual stream at every layer, over the
//! hidden states of the prompt set's scored tokens pooled together
//! ([`measure`]).
//!
//! The residuals arrive a few prompts at a time and only the scored rows
//! are kept: the pool is `[layers + 1, scored tokens, hidden]`, never every
//! position of every prompt.

pub mod measure;

use probe_sdk::prelude::*;
use probe_sdk::prompts::prompt_params;

use measure::{pool_geometry, Geometry};

/// Sequences whose residuals one forward batch returns at once.
const BATCH_SEQUENCES: usize = 16;

struct GeometryPlugin;

impl Plugin for GeometryPlugin {
    const NAME: &'static str = "geometry";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const SUMMARY: &'static str =
        "What the residual stream looks like at every layer: dimensionality, isotropy, norms, category separation";
    const DESCRIPTION: &'static str = "Over the hidden states of every scored token of the prompt set (probes/prompts.jsonl or prompts=FILE; the model's own greedy completion where a line has none), pooled, at every layer (−1 = the embedding's output, then the residual after each block): participation_ratio = (Σλ)² / Σλ² of the covariance eigenvalues λ of the centred states; isotropy_raw and isotropy_centred = mean cosine over every pair of distinct tokens, of the states and of the states minus their mean (exact over all pairs); mean_norm = mean ‖h‖; spectral_flatness = geometric / arithmetic mean of the min(N − 1, hidden) largest λ a pool of N tokens can hold (0 when one is zero, as when a state repeats); category_separation = (c̄_intra − c̄_inter) / |c̄_inter| with c̄ the mean cosine over pairs of tokens from the same / different categories (of the states as they are: centred, the inter-category mean is ≈ 0 by construction and the ratio meaningless); erank = exp(−Σ qᵢ ln qᵢ), qᵢ = σᵢ / Σσⱼ over the singular values of the (uncentred) states.";

    fn params() -> Vec<ParamSpec> {
        prompt_params()
    }

    fn work_items(_host: &Host, _params: &Params) -> Result<usize, PluginError> {
        Ok(1)
    }

    fn run(host: &Host, params: &Params, _items: &[usize]) -> Result<DataFrame, PluginError> {
        let model = host.model()?;
        let mut hidden = 0;
        let set = PromptSet::from_params(params)?;
        let sequences = host.prompt_sequences(&set, &PromptOptions::from_params(params)?)?;
        let mut names: Vec<&str> = set.prompts.iter().map(|p| p.category.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        let stages = model.num_layers + 1;
        let mut pools: Vec<Vec<f32>> = vec![Vec::new(); stages];
        let mut categories: Vec<usize> = Vec::new();
        for (chunk, prompts) in sequences
            .chunks(BATCH_SEQUENCES)
            .zip(set.prompts.chunks(BATCH_SEQUENCES))
        {
            host.check_cancelled()?;
            let requests: Vec<ForwardRequest> =
                chunk.iter().map(Sequence::residual_request).collect();
            for ((sequence, prompt), output) in chunk
                .iter()
                .zip(prompts)
                .zip(host.forward_batch(&requests)?)
            {
                if output.residuals.len() != stages {
                    return Err(format!(
                        "the forward pass kept {} residuals for {stages} stages",
                        output.residuals.len()
                    )
                    .into());
                }
                hidden = output.hidden;
                let category = names
                    .binary_search(&prompt.category.as_str())
                    .unwrap_or_default();
                for p in sequence.scored_positions() {
                    categories.push(category);
                    for (pool, residual) in pools.iter_mut().zip(&output.residuals) {
                        pool.extend_from_slice(&residual[p * hidden..(p + 1) * hidden]);
                    }
                }
            }
            host.progress(categories.len() as u64, 0, "scored tokens");
        }
        if categories.len() < 2 {
            return Err(format!(
                "{}: {} scored token(s); the geometry of a pool needs at least 2",
                set.name,
                categories.len()
            )
            .into());
        }
        let mut rows: Vec<Geometry> = Vec::with_capacity(stages);
        for (stage, pool) in pools.iter().enumerate() {
            host.check_cancelled()?;
            rows.push(
                pool_geometry(pool, hidden, &categories)
                    .map_err(|e| format!("layer {}: {e}", stage as i64 - 1))?,
            );
            host.progress((stage + 1) as u64, stages as u64, "layers");
        }
        let column = |f: fn(&Geometry) -> f64| rows.iter().map(f).collect::<Vec<f64>>();
        Ok(df!(
            "layer" => (0..stages).map(|s| s as i64 - 1).collect::<Vec<_>>(),
            "tokens" => vec![categories.len() as i64; stages],
            "participation_ratio" => column(|g| g.participation_ratio),
            "isotropy_raw" => column(|g| g.isotropy_raw),
            "isotropy_centred" => column(|g| g.isotropy_centred),
            "mean_norm" => column(|g| g.mean_norm),
            "spectral_flatness" => column(|g| g.spectral_flatness),
            "category_separation" => rows.iter().map(|g| g.category_separation).collect::<Vec<Option<f64>>>(),
            "erank" => column(|g| g.erank),
        )?)
    }
}

export_plugin!(GeometryPlugin);
