#!/usr/bin/env python3
"""An independent computation of the lens, knockout, swap and quant tables, in numpy f64.

It shares no code with probe: it reads the exact token sequences probe ran
(the `tokens` companion table: prompt_index, position, token_id, scored) and
runs its own forward pass (the numpy model of
fixtures/reference/forward_reference.py, llama-like decoders), its own logit
lens and its own losses with blocks left out or exchanged, or with one
block's weight matrices rounded to b bits (symmetric per-group
round-to-nearest in float32, ties to even, as
plugins/quant/reference/quantize_reference.py; the block scope rows of the
quant table, group from --group).

    studies_reference.py MODEL TOKENS.csv --lens L.csv --knockout K.csv --swap S.csv --quant Q.csv --time --diff D.json

Every table given is recomputed and compared row by row (the swap rows are
those probe's table has, e.g. `--param max_gap=1`); the comparison (largest
differences, rank and top-1 disagreements, and whether every generated token
is the f64 model's own greedy choice) goes to D.json; with --time the
seconds of the computation alone are printed (and each part's seconds —
the forward pass with every stage, then each study — are in D.json). `cargo xtask bench lens` runs it
against probe on SmolLM2. Needs numpy.
"""

import argparse
import csv
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "fixtures" / "reference"))
import forward_reference as fr  # noqa: E402


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def sequences(tokens_csv):
    by_prompt = defaultdict(list)
    for r in read_csv(tokens_csv):
        by_prompt[int(r["prompt_index"])].append(
            (int(r["position"]), int(r["token_id"]), r["scored"].lower() == "true")
        )
    out = {}
    for prompt, rows in sorted(by_prompt.items()):
        rows.sort()
        out[prompt] = ([t for _, t, _ in rows], [p for p, _, s in rows if s])
    return out


def log_softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


class Model:
    def __init__(self, folder):
        self.w, self.c = fr.load(folder)
        self.family = self.c.get("model_type", "llama").replace("gemma3_text", "gemma3")
        self.blocks = self.c["num_hidden_layers"]

    def stages(self, tokens):
        x = fr.llama_embed(self.w, self.c, self.family, tokens)
        out = [x]
        for i in range(self.blocks):
            x = fr.llama_block(self.w, self.c, self.family, i, x)
            out.append(x)
        return out

    def run(self, x, blocks):
        for i in blocks:
            x = fr.llama_block(self.w, self.c, self.family, i, x)
        return x

    def log_probs(self, rows):
        return log_softmax(fr.llama_head(self.w, self.c, self.family, rows))


def lens_rows(model, seqs, stages):
    rows = {}
    greedy = [0, 0]
    for prompt, (tokens, scored) in seqs.items():
        if not scored:
            continue
        targets = np.array([tokens[p + 1] for p in scored])
        final = model.log_probs(stages[prompt][-1][scored])
        p_final = np.exp(final)
        greedy[0] += int((final.argmax(axis=-1) == targets).sum())
        greedy[1] += len(scored)
        for s, stage in enumerate(stages[prompt]):
            lp = model.log_probs(stage[scored])
            p = np.exp(lp)
            z_target = lp[np.arange(len(scored)), targets]
            for k, pos in enumerate(scored):
                rows[(prompt, pos, s - 1)] = {
                    "target_rank": int((lp[k] > z_target[k]).sum()),
                    "target_prob": float(np.exp(z_target[k])),
                    "top1": int(lp[k].argmax()),
                    "top1_prob": float(p[k].max()),
                    "entropy": float(-(p[k] * lp[k]).sum()),
                    "kl_to_final": float((p_final[k] * (final[k] - lp[k])).sum()),
                }
    return rows, greedy


def set_loss(model, seqs, finals):
    total, n = 0.0, 0
    for prompt, (tokens, scored) in seqs.items():
        if not scored:
            continue
        lp = model.log_probs(finals[prompt][scored])
        total -= lp[np.arange(len(scored)), [tokens[p + 1] for p in scored]].sum()
        n += len(scored)
    return total / n


def loss_from(model, seqs, stages, stage, blocks):
    finals = {prompt: model.run(stages[prompt][stage], blocks) for prompt in seqs}
    return set_loss(model, seqs, finals)


def round_rows(w, bits, group):
    """Round every row of a float32 (out, in) matrix in groups along `in`."""
    qmax = np.float32(2 ** (bits - 1) - 1)
    qmin = np.float32(-(2 ** (bits - 1)))
    out = w.copy()
    for start in range(0, w.shape[1], group):
        g = w[:, start:start + group]
        m = np.abs(g).max(axis=1, keepdims=True)
        scale = (m / qmax).astype(np.float32)
        safe = np.where(scale == 0, np.float32(1), scale)
        q = np.clip(np.round(g / safe), qmin, qmax) * safe
        out[:, start:start + group] = np.where(scale == 0, g, q)
    return out


def block_rounded(model, layer, bits, group):
    """The block's 2-D weights rounded to `bits` (f32 arithmetic, f64 out)."""
    prefix = f"model.layers.{layer}."
    return {
        name: round_rows(w.astype(np.float32), bits, group).astype(np.float64)
        for name, w in model.w.items()
        if name.startswith(prefix) and name.endswith(".weight") and w.ndim == 2
    }


def compare_lens(ours, probe_csv):
    worst = {c: 0.0 for c in ("target_prob", "top1_prob", "entropy", "kl_to_final")}
    disagree = {"target_rank": 0, "top1": 0}
    theirs = read_csv(probe_csv)
    if len(theirs) != len(ours):
        raise SystemExit(f"{probe_csv}: {len(theirs)} rows, the reference has {len(ours)}")
    for r in theirs:
        key = (int(r["prompt_index"]), int(r["position"]), int(r["layer"]))
        if key not in ours:
            raise SystemExit(f"{probe_csv}: row {key} is not a scored (prompt, position, layer)")
        o = ours[key]
        for c in worst:
            worst[c] = max(worst[c], abs(float(r[c]) - o[c]))
        for c in disagree:
            disagree[c] += int(r[c]) != o[c]
    return {"rows": len(theirs), "max_abs_diff": worst, "disagreements": disagree}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("tokens", type=Path, help="probe's `tokens` companion table (CSV)")
    parser.add_argument("--lens", type=Path, help="probe's lens table (CSV)")
    parser.add_argument("--knockout", type=Path, help="probe's knockout table (CSV)")
    parser.add_argument("--swap", type=Path, help="probe's swap table (CSV)")
    parser.add_argument("--quant", type=Path, help="probe's quant table (CSV; its block rows)")
    parser.add_argument("--group", type=int, default=128, help="the quant table's group size")
    parser.add_argument("--diff", type=Path, help="write the comparison here, not to stdout")
    parser.add_argument("--time", action="store_true", help="print the computation's seconds")
    args = parser.parse_args()

    start = time.perf_counter()
    model = Model(args.model)
    seqs = sequences(args.tokens)
    stages = {prompt: model.stages(tokens) for prompt, (tokens, _) in seqs.items()}
    report = {"scored_tokens": sum(len(s) for _, s in seqs.values())}
    base = set_loss(model, seqs, {p: s[-1] for p, s in stages.items()})
    report["base_loss"] = base
    seconds = {"forward": time.perf_counter() - start}
    if args.lens:
        began = time.perf_counter()
        ours, greedy = lens_rows(model, seqs, stages)
        seconds["lens"] = time.perf_counter() - began
        report["lens"] = compare_lens(ours, args.lens)
        report["scored_tokens_that_are_the_f64_top1"] = greedy
    if args.knockout:
        began = time.perf_counter()
        worst = 0.0
        for r in read_csv(args.knockout):
            i = int(r["layer"])
            loss = loss_from(model, seqs, stages, i, range(i + 1, model.blocks))
            worst = max(worst, abs(float(r["loss"]) - loss), abs(float(r["base_loss"]) - base))
        report["knockout_max_abs_diff_loss"] = worst
        seconds["knockout"] = time.perf_counter() - began
    if args.swap:
        began = time.perf_counter()
        worst, n = 0.0, 0
        for r in read_csv(args.swap):
            i, j = int(r["layer_i"]), int(r["layer_j"])
            order = [j, *range(i + 1, j), i, *range(j + 1, model.blocks)]
            loss = loss_from(model, seqs, stages, i, order)
            worst = max(worst, abs(float(r["loss"]) - loss))
            n += 1
        report["swap_pairs"] = n
        report["swap_max_abs_diff_loss"] = worst
        seconds["swap"] = time.perf_counter() - began
    if args.quant:
        began = time.perf_counter()
        worst, n = 0.0, 0
        for r in read_csv(args.quant):
            if r["scope"] != "block":
                continue
            i, bits = int(r["layer"]), int(r["bits"])
            rounded = block_rounded(model, i, bits, args.group)
            stored = {name: model.w[name] for name in rounded}
            model.w.update(rounded)
            loss = loss_from(model, seqs, stages, i, range(i, model.blocks))
            model.w.update(stored)
            worst = max(worst, abs(float(r["loss"]) - loss), abs(float(r["base_loss"]) - base))
            n += 1
        report["quant_rows"] = n
        report["quant_max_abs_diff_loss"] = worst
        seconds["quant"] = time.perf_counter() - began
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
