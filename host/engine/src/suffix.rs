//! Edited runs that share everything before their first edited row.
//!
//! In a causal model row i depends on rows ≤ i only, so a request whose
//! edits all touch rows ≥ p computes, before row p, exactly what the same
//! request without its edits computes. Activation patching makes hundreds
//! of such requests per prompt — one activation at one position each — and
//! re-running every row of every one of them is most of its cost.
//!
//! So when a batch holds several edited requests with the same tokens,
//! start residual, blocks and weight overrides, the engine runs their
//! unedited base once, keeping every block's keys and values, and then runs
//! each request's rows p … T−1 alone, block by block, on the block's step
//! graph (the generation path's cache step, with its hooks open where an
//! edit sits inside the block) over the base's cached keys and values of
//! rows < p. The final residual's rows before p are the base's. A group is
//! run this way only when it saves rows: the base costs one whole run, so
//! the members' skipped rows must add up to more than one sequence.
//!
//! The suffixes differ from whole runs by float rounding only (the same
//! operations on differently shaped matrices): the test
//! `forward::edited_runs_over_a_shared_base_equal_whole_runs` holds them to
//! the whole runs on every family.

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};

use probe_store::arch::Attention;

use crate::engine::{
    apply_edits, hook_inputs, hooks_at, Engine, KeysValues, Pending, Request, STACK_TOKENS,
};
use crate::generate::StepRows;
use crate::ForwardError;

/// A request run as the rows from `first` on over a base run.
struct Member {
    request: usize,
    /// Index of its base among the batch's bases.
    base: usize,
    /// Its first edited row: the rows before it are the base's.
    first: usize,
    /// Its rows `first …` after the block runs done so far.
    rows: Vec<f32>,
    done: usize,
}

/// The overrides a request reads, by buffer: requests share a run only
/// when they read the same values.
fn overrides_key(request: &Request<'_>) -> Vec<(usize, usize)> {
    let mut key: Vec<(usize, usize)> = request
        .overrides
        .iter()
        .map(|o| (o.values.as_ptr() as usize, o.values.len()))
        .collect();
    key.sort_unstable();
    key
}

/// Whether two requests compute the same rows before their edits: the same
/// tokens, blocks, start residual (bit for bit) and override buffers.
fn same_base(a: &Request<'_>, b: &Request<'_>) -> bool {
    let bits = |s: Option<&[f32]>| s.map(|s| s.iter().map(|v| v.to_bits()).collect::<Vec<_>>());
    a.tokens == b.tokens
        && a.blocks == b.blocks
        && overrides_key(a) == overrides_key(b)
        && bits(a.start) == bits(b.start)
}

fn base_hash(request: &Request<'_>) -> u64 {
    let mut hasher = DefaultHasher::new();
    request.tokens.hash(&mut hasher);
    request.blocks.hash(&mut hasher);
    overrides_key(request).hash(&mut hasher);
    if let Some(start) = request.start {
        for v in start {
            v.to_bits().hash(&mut hasher);
        }
    }
    hasher.finish()
}

impl Engine<'_> {
    /// The first row a request's edits touch, when the request may run as
    /// the rows from there on over a shared base: causal attention in every
    /// block it runs, the whole block, no branches, and nothing captured
    /// but the final residual (and what the head makes of it).
    fn first_edited_row(&self, request: &Request<'_>, blocks: &[usize]) -> Option<usize> {
        let capture = request.capture;
        if request.branches.is_some()
            || request.sublayer.is_some()
            || request.kinds.is_some()
            || capture.residuals
            || capture.updates
            || capture.attention
            || capture.z
            || blocks
                .iter()
                .any(|&b| self.arch.blocks[b].attention == Attention::Bidirectional)
        {
            return None;
        }
        let first = request.edits.iter().map(|e| e.position).min()?;
        (first > 0).then_some(first)
    }

    /// Run the requests of a batch that gain from it as suffixes over their
    /// shared base runs (the module's doc), leaving them done in `pending`;
    /// the others are left as they are.
    pub(crate) fn run_suffixes(
        &mut self,
        requests: &[Request<'_>],
        pending: &mut [Pending],
        tables: &[(Vec<f32>, Vec<f32>)],
    ) -> Result<(), ForwardError> {
        // Group the candidates by their base.
        let mut groups: Vec<(usize, Vec<(usize, usize)>)> = Vec::new();
        let mut by_hash: HashMap<u64, Vec<usize>> = HashMap::new();
        for (i, request) in requests.iter().enumerate() {
            let Some(first) = self.first_edited_row(request, &pending[i].trace.blocks) else {
                continue;
            };
            let slot = by_hash.entry(base_hash(request)).or_default();
            match slot
                .iter()
                .find(|&&g| same_base(&requests[groups[g].0], request))
            {
                Some(&g) => groups[g].1.push((i, first)),
                None => {
                    slot.push(groups.len());
                    groups.push((i, vec![(i, first)]));
                }
            }
        }
        // A base costs one whole run: worth it when the members skip more.
        groups.retain(|(base, members)| {
            members.iter().map(|&(_, first)| first).sum::<usize>() > requests[*base].tokens.len()
        });
        if groups.is_empty() {
            return Ok(());
        }

        let bases: Vec<Request<'_>> = groups
            .iter()
            .map(|&(i, _)| Request {
                tokens: requests[i].tokens,
                blocks: requests[i].blocks,
                start: requests[i].start,
                overrides: requests[i].overrides,
                ..Default::default()
            })
            .collect();
        let base_runs = self.run_batch_keeping(&bases, true)?;
        let hidden = self.arch.hidden;
        let mut members: Vec<Member> = groups
            .iter()
            .enumerate()
            .flat_map(|(base, (_, members))| {
                members
                    .iter()
                    .map(move |&(request, first)| (base, request, first))
            })
            .map(|(base, request, first)| Member {
                request,
                base,
                first,
                rows: pending[request].residual[first * hidden..].to_vec(),
                done: 0,
            })
            .collect();

        loop {
            let left = |m: &Member| pending[m.request].trace.blocks.len() - m.done;
            let most = members.iter().map(left).max().unwrap_or(0);
            if most == 0 {
                break;
            }
            // This round's members by what their step runs share: the
            // block, hooks open or not, the rows before and after `first`,
            // and the weights.
            type StepKey = (usize, bool, usize, usize, Vec<(usize, usize)>);
            let mut by_step: BTreeMap<StepKey, Vec<usize>> = BTreeMap::new();
            for (k, m) in members.iter().enumerate() {
                if left(m) != most {
                    continue;
                }
                let request = &requests[m.request];
                let key = (
                    pending[m.request].trace.blocks[m.done],
                    hooks_at(request.edits, m.done).next().is_some(),
                    m.first,
                    request.tokens.len(),
                    overrides_key(request),
                );
                by_step.entry(key).or_default().push(k);
            }
            for ((block, hooked, first, t, _), alike) in by_step {
                let new_rows = t - first;
                for stack in alike.chunks((STACK_TOKENS / new_rows).max(1)) {
                    self.step_stack(
                        StackStep {
                            block,
                            hooked,
                            first,
                            t,
                            stack,
                        },
                        requests,
                        &mut members,
                        &base_runs,
                        tables,
                    )?;
                }
            }
        }

        for m in members {
            self.rows_reused += m.first * m.done;
            let (base, _) = &base_runs[m.base];
            let p = &mut pending[m.request];
            p.residual.clear();
            p.residual
                .extend_from_slice(&base.output[..m.first * hidden]);
            p.residual.extend_from_slice(&m.rows);
            p.done = p.trace.blocks.len();
        }
        Ok(())
    }

    /// One block run of a stack of members alike in everything but their
    /// edits and bases.
    fn step_stack(
        &mut self,
        step: StackStep<'_>,
        requests: &[Request<'_>],
        members: &mut [Member],
        base_runs: &[(crate::Trace, Vec<KeysValues>)],
        tables: &[(Vec<f32>, Vec<f32>)],
    ) -> Result<(), ForwardError> {
        let StackStep {
            block,
            hooked,
            first,
            t,
            stack,
        } = step;
        let (hidden, kv_heads, dh) = (self.arch.hidden, self.arch.kv_heads, self.arch.head_dim);
        let new_rows = t - first;
        let rows: Vec<f32> = stack
            .iter()
            .flat_map(|&k| members[k].rows.iter().copied())
            .collect();
        let positions: Vec<usize> = stack.iter().flat_map(|_| first..t).collect();
        let columns: Vec<Vec<Option<usize>>> =
            stack.iter().map(|_| (0..t).map(Some).collect()).collect();
        // Each member's base keys and values of rows < first, this block run.
        let mut past_keys = Vec::with_capacity(stack.len() * kv_heads * first * dh);
        let mut past_values = Vec::with_capacity(past_keys.capacity());
        for &k in stack {
            let m = &members[k];
            let (keys, values) = &base_runs[m.base].1[m.done];
            for h in 0..kv_heads {
                let rows = h * t * dh..(h * t + first) * dh;
                past_keys.extend_from_slice(&keys[rows.clone()]);
                past_values.extend_from_slice(&values[rows]);
            }
        }
        let hooks = hooked.then(|| {
            hook_inputs(
                stack.iter().enumerate().map(|(s, &k)| {
                    let m = &members[k];
                    (
                        s * new_rows,
                        first,
                        hooks_at(requests[m.request].edits, m.done),
                    )
                }),
                rows.len() / hidden,
                hidden,
                self.arch.heads * dh,
                dh,
            )
        });
        let (out, _) = self.step_rows(
            &StepRows {
                block,
                rows: &rows,
                positions: &positions,
                columns: &columns,
                past_keys: &past_keys,
                past_values: &past_values,
                hooks: hooks.as_ref(),
                overrides: requests[members[stack[0]].request].overrides,
                keep_cache: false,
            },
            tables,
        )?;
        for (s, &k) in stack.iter().enumerate() {
            let m = &mut members[k];
            m.rows.clear();
            m.rows
                .extend_from_slice(&out[s * new_rows * hidden..(s + 1) * new_rows * hidden]);
            m.done += 1;
            apply_edits(
                &mut m.rows,
                hidden,
                requests[m.request].edits,
                m.done,
                first,
            );
        }
        Ok(())
    }
}

/// One step run of members: the block, whether its hooks are open, the
/// members' first edited row and length, and which members.
struct StackStep<'s> {
    block: usize,
    hooked: bool,
    first: usize,
    t: usize,
    stack: &'s [usize],
}
