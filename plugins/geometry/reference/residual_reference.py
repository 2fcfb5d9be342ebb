#!/usr/bin/env python3
"""An independent computation of the geometry, autopsy and linearity tables, in numpy f64.

It shares no code with probe: it reads the exact token sequences probe ran
(a lens run's `tokens` companion table), the categories from the prompt set
(JSONL), and runs its own forward pass (fixtures/reference/forward_reference.py,
llama-like decoders) and its own measures:

- geometry: participation ratio, isotropy raw/centred (every pair), mean
  norm, spectral flatness, category separation and erank of the scored
  tokens' hidden states at every layer;
- autopsy: attention entropy (the probabilities recorded from the reference's
  own attention), residual/update statistics, erank, norm growth and the
  first-position share and ratio, every position of every prompt;
- linearity: the gap, amplification and update ratio of each block and
  sublayer at the rows of probe's table (`--linearity`, with its settings
  given again), the sublayers as the block with its MLP's down projection
  (attention alone) or its attention's output projection (MLP alone) set to
  zero, and directions from numpy's own generator — so the gaps agree with
  probe's to their sampling error, not digit for digit (the update ratio,
  which has no randomness, agrees exactly).

    residual_reference.py MODEL TOKENS.csv PROMPTS.jsonl --geometry G.csv --autopsy A.csv
        --linearity L.csv --sample 10 --time --diff D.json

`cargo xtask bench residual` runs it against probe on SmolLM2. Needs numpy.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parents[3] / "fixtures" / "reference"))
sys.path.insert(0, str(HERE.parents[2] / "lens" / "reference"))
import forward_reference as fr  # noqa: E402
from studies_reference import Model, read_csv, sequences  # noqa: E402


def eigen_sigma(h):
    """Singular values of H from its Gram matrix (as many as hidden)."""
    lam = np.linalg.eigvalsh(h.T @ h)
    return np.sqrt(np.clip(lam, 0, None))


def erank(sigma):
    total = sigma.sum()
    q = sigma[sigma > 0] / total
    return float(np.exp(-(q * np.log(q)).sum()))


def mean_pair_cosine(h, mask=None):
    u = h / np.linalg.norm(h, axis=1, keepdims=True)
    c = u @ u.T
    n = len(h)
    off = ~np.eye(n, dtype=bool)
    if mask is not None:
        off &= mask
    return float(c[off].mean())


def geometry_row(h, categories):
    centred = h - h.mean(0)
    lam = np.linalg.eigvalsh(centred.T @ centred / len(h))[::-1]
    pr = lam.sum() ** 2 / (lam**2).sum()
    keep = lam[: min(len(h) - 1, h.shape[1])]
    tiny = keep <= 1e-10 * lam[0]
    flat = 0.0 if tiny.any() else float(np.exp(np.log(keep).mean()) / keep.mean())
    same = categories[:, None] == categories[None, :]
    intra = mean_pair_cosine(h, same)
    inter = mean_pair_cosine(h, ~same)
    return {
        "participation_ratio": float(pr),
        "isotropy_raw": mean_pair_cosine(h),
        "isotropy_centred": mean_pair_cosine(centred),
        "mean_norm": float(np.linalg.norm(h, axis=1).mean()),
        "spectral_flatness": flat,
        "category_separation": (intra - inter) / abs(inter),
        "erank": erank(eigen_sigma(h)),
    }


def compare(theirs, ours, key, columns):
    """Largest relative difference per column over rows matched by `key`."""
    worst = {c: 0.0 for c in columns}
    for r in theirs:
        o = ours[key(r)]
        for c in columns:
            if r[c] == "":
                continue
            want = o[c]
            worst[c] = max(worst[c], abs(float(r[c]) - want) / max(abs(want), 1e-12))
    return worst


class Recorder:
    """The reference attention, keeping its probabilities."""

    def __init__(self):
        self.probs = None
        self.inner = fr.attention

    def __call__(self, q, k, v, scale, allowed):
        groups = q.shape[0] // k.shape[0]
        kk = np.repeat(k, groups, axis=0)
        scores = q @ kk.transpose(0, 2, 1) * scale
        scores = np.where(allowed[None], scores, -np.inf)
        scores = scores - scores.max(-1, keepdims=True)
        p = np.exp(scores)
        self.probs = p / p.sum(-1, keepdims=True)
        return self.inner(q, k, v, scale, allowed)


def zeroed(model, layer, name):
    """The block's weights with `name` (a suffix) set to zero, to restore after."""
    key = f"model.layers.{layer}.{name}"
    stored = model.w[key]
    model.w[key] = np.zeros_like(stored)
    return key, stored


def block(model, layer, x):
    return fr.llama_block(model.w, model.c, model.family, layer, x)


def attention_part(model, layer, x):
    key, stored = zeroed(model, layer, "mlp.down_proj.weight")
    try:
        return block(model, layer, x)
    finally:
        model.w[key] = stored


def mlp_part(model, layer, x):
    key, stored = zeroed(model, layer, "self_attn.o_proj.weight")
    try:
        return block(model, layer, x)
    finally:
        model.w[key] = stored


def autopsy(model, seqs, stages):
    heads = model.c["num_attention_heads"]
    rows = {}
    for layer in range(model.blocks):
        recorder = Recorder()
        fr.attention = recorder
        entropy, queries = 0.0, 0
        res, attn, mlp, outs = [], [], [], []
        growth, firsts, all_norms, first_norms, tokens = 0.0, 0, 0.0, 0.0, 0
        for prompt, (tokens_, _) in seqs.items():
            x = stages[prompt][layer]
            mid = attention_part(model, layer, x)
            p = recorder.probs
            out = block(model, layer, x)
            with np.errstate(divide="ignore", invalid="ignore"):
                entropy -= np.where(p > 0, p * np.log(p), 0.0).sum()
            queries += len(tokens_)
            res.append(out)
            attn.append(mid - x)
            mlp.append(out - mid)
            outs.append(out)
            before, after = np.linalg.norm(x, axis=1), np.linalg.norm(out, axis=1)
            growth += (after / before).sum()
            tokens += len(after)
            all_norms += after.sum()
            first_norms += after[0]
            firsts += 1
        fr.attention = recorder.inner
        row = {"attention_entropy": entropy / (queries * heads)}
        for name, arrays in (("residual", res), ("attn_update", attn), ("mlp_update", mlp)):
            v = np.concatenate([a.ravel() for a in arrays])
            row[f"{name}_mean"] = float(v.mean())
            row[f"{name}_std"] = float(v.std())
            row[f"{name}_rms"] = float(np.sqrt((v * v).mean()))
        row["erank"] = erank(eigen_sigma(np.concatenate(outs)))
        row["norm_growth"] = growth / tokens
        row["first_position_share"] = first_norms / all_norms
        row["first_position_norm_ratio"] = (first_norms / firsts) / (
            (all_norms - first_norms) / (tokens - firsts)
        )
        rows[layer] = row
    return rows


def sample(prompts, n):
    """`n` prompts taken in turn from each category (first-appearance order)."""
    if n == 0 or n >= len(prompts):
        return sorted(range(len(prompts)))
    order = []
    for i, p in enumerate(prompts):
        if p["category"] not in order:
            order.append(p["category"])
    chosen, r = [], 0
    while len(chosen) < n:
        for c in order:
            members = [i for i, p in enumerate(prompts) if p["category"] == c]
            if r < len(members) and len(chosen) < n:
                chosen.append(members[r])
        r += 1
    return sorted(chosen)


def order(points):
    x = np.log([e for e, _ in points])
    y = np.log([g for _, g in points])
    return float(((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum())


def linearity(model, seqs, stages, chosen, layers, sweep, epsilon, directions, sweep_directions, seed):
    """(layer, part) → gap, amplification and update ratio at `epsilon`
    over `directions`, and the order over `sweep` with `sweep_directions`."""
    rng = np.random.default_rng(seed)
    d = model.c["hidden_size"]
    out = {}
    for layer in layers:
        for part in ("block", "attention", "mlp"):
            gaps, amps, ratios = [], [], []
            curve = {e: [] for e in sweep}
            for prompt in chosen:
                tokens, scored = seqs[prompt]
                t = scored[-1] + 1  # the last token reaches no scored row
                x = stages[prompt][layer][:t]
                if part == "mlp":
                    x = attention_part(model, layer, x)
                f = {
                    "block": lambda y: block(model, layer, y),
                    "attention": lambda y: attention_part(model, layer, y),
                    "mlp": lambda y: mlp_part(model, layer, y),
                }[part]
                base = f(x)
                ratios.extend(
                    np.linalg.norm((base - x)[scored], axis=1) / np.linalg.norm(x[scored], axis=1)
                )
                dirs = rng.standard_normal((max(directions, sweep_directions), t, d))
                dirs /= np.linalg.norm(dirs, axis=2, keepdims=True)
                for eps in sweep:
                    used = max(directions, sweep_directions) if eps == epsilon else sweep_directions
                    for k in range(used):
                        delta = eps * np.linalg.norm(x, axis=1, keepdims=True) * dirs[k]
                        fp, fm = f(x + delta), f(x - delta)
                        change = (fp - base - delta)[scored]
                        nonlinear = (0.5 * (fp + fm) - base)[scored]
                        gap = np.linalg.norm(nonlinear, axis=1) / np.linalg.norm(change, axis=1)
                        if k < sweep_directions:
                            curve[eps].extend(gap)
                        if eps == epsilon and k < directions:
                            gaps.extend(gap)
                            amps.extend(
                                np.linalg.norm(change, axis=1)
                                / np.linalg.norm(delta[scored], axis=1)
                            )
            out[(layer, part)] = {
                "gap": float(np.mean(gaps)),
                "gap_std": float(np.std(gaps)),
                "gap_se": float(np.std(gaps) / np.sqrt(len(gaps))),
                "amplification": float(np.mean(amps)),
                "update_ratio": float(np.mean(ratios)),
                "order": order([(e, np.mean(g)) for e, g in curve.items()]),
            }
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("tokens", type=Path, help="a lens run's `tokens` companion table (CSV)")
    parser.add_argument("prompts", type=Path, help="the prompt set (JSONL) it ran")
    parser.add_argument("--geometry", type=Path, help="probe's geometry table (CSV)")
    parser.add_argument("--autopsy", type=Path, help="probe's autopsy table (CSV)")
    parser.add_argument("--linearity", type=Path, help="probe's linearity table (CSV)")
    parser.add_argument("--sample", type=int, default=10)
    parser.add_argument("--eps", type=float, nargs="+", default=[0.01, 0.02, 0.05, 0.1, 0.2])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--diff", type=Path)
    parser.add_argument("--time", action="store_true")
    args = parser.parse_args()

    start = time.perf_counter()
    model = Model(args.model)
    seqs = sequences(args.tokens)
    prompts = [json.loads(line) for line in args.prompts.read_text().splitlines() if line.strip()]
    stages = {p: model.stages(tokens) for p, (tokens, _) in seqs.items()}
    seconds = {"forward": time.perf_counter() - start}
    report = {}
    if args.geometry:
        began = time.perf_counter()
        names = sorted({p["category"] for p in prompts})
        cats = np.array([names.index(prompts[p]["category"]) for p, (_, s) in seqs.items() for _ in s])
        ours = {}
        for stage in range(model.blocks + 1):
            h = np.concatenate([stages[p][stage][s] for p, (_, s) in seqs.items() if s])
            ours[stage - 1] = geometry_row(h, cats)
        theirs = read_csv(args.geometry)
        report["geometry_max_rel_diff"] = compare(
            theirs, ours, lambda r: int(r["layer"]), list(ours[0].keys())
        )
        seconds["geometry"] = time.perf_counter() - began
    if args.autopsy:
        began = time.perf_counter()
        ours = autopsy(model, seqs, stages)
        theirs = read_csv(args.autopsy)
        report["autopsy_max_rel_diff"] = compare(
            theirs, ours, lambda r: int(r["layer"]), list(ours[0].keys())
        )
        seconds["autopsy"] = time.perf_counter() - began
    if args.linearity:
        began = time.perf_counter()
        theirs = read_csv(args.linearity)
        layers = sorted({int(r["layer"]) for r in theirs})
        epsilon = float(theirs[0]["epsilon"])
        sweep = sorted(set(args.eps) | {epsilon})
        chosen = sample(prompts, args.sample)
        ours = linearity(
            model, seqs, stages, chosen, layers, sweep, epsilon,
            int(theirs[0]["directions"]), int(theirs[0]["sweep_directions"]), args.seed,
        )
        worst_z, worst_rel = 0.0, {"gap": 0.0, "amplification": 0.0, "update_ratio": 0.0}
        worst_order = 0.0
        for r in theirs:
            o = ours[(int(r["layer"]), r["part"])]
            # Two independent samples of directions: their means differ by
            # about √2 standard errors.
            worst_z = max(worst_z, abs(float(r["gap"]) - o["gap"]) / (np.sqrt(2) * o["gap_se"]))
            for c in worst_rel:
                worst_rel[c] = max(worst_rel[c], abs(float(r[c]) - o[c]) / abs(o[c]))
            worst_order = max(worst_order, abs(float(r["order"]) - o["order"]))
        report["linearity_rows"] = len(theirs)
        report["linearity_max_rel_diff"] = worst_rel
        report["linearity_max_gap_z"] = worst_z
        report["linearity_max_abs_diff_order"] = worst_order
        seconds["linearity"] = time.perf_counter() - began
    report["seconds"] = seconds
    total = time.perf_counter() - start
    text = json.dumps(report, indent=1)
    if args.diff:
        args.diff.write_text(text)
    else:
        print(text, file=sys.stderr if args.time else sys.stdout)
    if args.time:
        print(f"{total:.3f}")


if __name__ == "__main__":
    main()
