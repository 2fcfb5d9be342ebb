#!/usr/bin/env python3
"""An independent computation of the patch plugin's table, in numpy f64.

It shares no code with probe: the pairs go through the `tokenizers` Python
package (the prompts with the tokenizer's own special tokens, `answer` and
`wrong` without, their first token scored), and every clean, corrupted and
patched run is its own forward pass of a llama-like decoder written here,
with the three hook points a patch needs (each block's attention output,
its MLP output, and each head's output before the output projection):

- LD = log p(answer) − log p(wrong) at the last position (z[answer] −
  z[wrong]); pairs with |LD_clean − LD_corrupt| under `--min-gap` skipped;
- for every (component, layer, position[, head]) of probe's table: the
  corrupted run with that activation taken from the clean run (`denoise`),
  run from the block it sits in; effect = (LD − LD_corrupt) / (LD_clean −
  LD_corrupt); kl = KL(p_clean ‖ p_patched) at the last position.

The patched runs of one (pair, layer) go through the blocks together, one
numpy batch. Compares every row of probe's CSV tables (`--table`, any
number) by (pair, component, layer, position, head).

    patch_reference.py MODEL PAIRS.jsonl --table patch.csv [--table heads.csv]
        --diff D.json

`cargo xtask bench patch` runs it against probe on SmolLM2. Needs numpy and
tokenizers.
"""

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "fixtures" / "reference"))
import forward_reference as fr  # noqa: E402


class Llama:
    """A llama-like decoder over a leading batch axis: x is [S, T, hidden]."""

    def __init__(self, folder):
        self.w, self.c = fr.load(folder)
        c = self.c
        self.blocks = c["num_hidden_layers"]
        self.heads = c["num_attention_heads"]
        self.kv = c["num_key_value_heads"]
        self.hidden = c["hidden_size"]
        self.hd = c.get("head_dim", self.hidden // self.heads)
        self.eps = c["rms_norm_eps"]
        self.theta = c.get("rope_theta", 10000.0)
        w = self.w
        self.head = w.get("lm_head.weight", w["model.embed_tokens.weight"])

    def embed(self, tokens):
        return self.w["model.embed_tokens.weight"][tokens][None]

    def block(self, i, x, patch=None):
        """Block i on x [S, T, d]; `patch` maps a hook ("attn", "mlp", ("z",
        head)) to (rows, position, values [S', width]): the rows of the
        batch whose activation at `position` is replaced. Returns the new x
        and the block's attention output, MLP output and z."""
        w, p = self.w, f"model.layers.{i}."
        s, t, _ = x.shape
        h, kv, hd = self.heads, self.kv, self.hd
        a_in = fr.rms(x, w[p + "input_layernorm.weight"], self.eps)

        def proj(name, heads):
            out = a_in @ w[p + f"self_attn.{name}.weight"].T
            bias = w.get(p + f"self_attn.{name}.bias")
            out = out if bias is None else out + bias
            return out.reshape(s, t, heads, hd).transpose(0, 2, 1, 3)

        q, k, v = proj("q_proj", h), proj("k_proj", kv), proj("v_proj", kv)
        pos = np.arange(t)
        q, k = fr.rotate(q, pos, self.theta), fr.rotate(k, pos, self.theta)
        k, v = np.repeat(k, h // kv, axis=1), np.repeat(v, h // kv, axis=1)
        scores = q @ k.transpose(0, 1, 3, 2) * hd**-0.5
        scores = np.where(fr.causal(t)[None, None], scores, -np.inf)
        scores -= scores.max(-1, keepdims=True)
        probs = np.exp(scores)
        probs /= probs.sum(-1, keepdims=True)
        z = (probs @ v).transpose(0, 2, 1, 3).reshape(s, t, h * hd)
        for hook, (rows, position, values) in (patch or {}).items():
            if isinstance(hook, tuple):
                head = hook[1]
                z[rows, position, head * hd : (head + 1) * hd] = values
        attn = z @ w[p + "self_attn.o_proj.weight"].T
        if patch and "attn" in patch:
            rows, position, values = patch["attn"]
            attn[rows, position] = values
        x = x + attn
        m_in = fr.rms(x, w[p + "post_attention_layernorm.weight"], self.eps)
        gate = m_in @ w[p + "mlp.gate_proj.weight"].T
        up = m_in @ w[p + "mlp.up_proj.weight"].T
        mlp = (fr.silu(gate) * up) @ w[p + "mlp.down_proj.weight"].T
        if patch and "mlp" in patch:
            rows, position, values = patch["mlp"]
            mlp[rows, position] = values
        return x + mlp, attn, mlp, z

    def log_probs(self, rows):
        final = fr.rms(rows, self.w["model.norm.weight"], self.eps)
        z = final @ self.head.T
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    def capture(self, tokens):
        """Every block's input, attention output, MLP output and z."""
        x = self.embed(tokens)
        run = {"resid": [], "attn": [], "mlp": [], "z": []}
        for i in range(self.blocks):
            run["resid"].append(x[0])
            x, attn, mlp, z = self.block(i, x)
            run["attn"].append(attn[0])
            run["mlp"].append(mlp[0])
            run["z"].append(z[0])
        run["last"] = self.log_probs(x[0, -1])
        return run


def encoder(model):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model / "tokenizer.json"))

    def prompt(text):
        return tok.encode(text, add_special_tokens=True).ids

    def first(text):
        return tok.encode(text, add_special_tokens=False).ids[0]

    return prompt, first


def read_rows(paths):
    rows = []
    for path in paths:
        with open(path, newline="") as f:
            rows.extend(csv.DictReader(f))
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model", type=Path)
    ap.add_argument("pairs", type=Path)
    ap.add_argument("--table", type=Path, action="append", default=[])
    ap.add_argument("--min-gap", type=float, default=1.0)
    ap.add_argument("--diff", type=Path)
    args = ap.parse_args()

    start = time.perf_counter()
    model = Llama(args.model)
    prompt, first = encoder(args.model)
    pairs = [json.loads(line) for line in args.pairs.read_text().splitlines() if line.strip()]
    theirs = read_rows(args.table)
    wanted = {}
    for r in theirs:
        wanted.setdefault((int(r["pair"]), int(r["layer"])), []).append(r)
    loaded = time.perf_counter()

    ours = {}
    skipped = []
    for index, pair in enumerate(pairs):
        clean_ids, corrupt_ids = prompt(pair["clean"]), prompt(pair["corrupt"])
        assert len(clean_ids) == len(corrupt_ids), f"pair {index}: lengths differ"
        answer, wrong = first(pair["answer"]), first(pair["wrong"])
        clean, corrupt = model.capture(clean_ids), model.capture(corrupt_ids)
        ld_clean = clean["last"][answer] - clean["last"][wrong]
        ld_corrupt = corrupt["last"][answer] - corrupt["last"][wrong]
        if abs(ld_clean - ld_corrupt) < args.min_gap:
            skipped.append(index)
            continue
        p_clean = np.exp(clean["last"])
        for layer in range(model.blocks):
            rows = wanted.get((index, layer), [])
            if not rows:
                continue
            # One batch row per site: the corrupted residual entering the
            # block, the clean value at the site.
            x = np.repeat(corrupt["resid"][layer][None], len(rows), axis=0)
            # Hook patches grouped by (hook, position): rows of the batch.
            groups = {}
            noop = set()
            for k, r in enumerate(rows):
                component, position = r["component"], int(r["position"])
                if component == "resid":
                    if np.array_equal(clean["resid"][layer][position], x[k, position]):
                        noop.add(k)
                    x[k, position] = clean["resid"][layer][position]
                    continue
                if component == "heads":
                    head, hd = int(r["head"]), model.hd
                    hook = ("z", head)
                    value = clean["z"][layer][position, head * hd : (head + 1) * hd]
                else:
                    hook, value = component, clean[component][layer][position]
                source = corrupt["z" if component == "heads" else component][layer][position]
                if component == "heads":
                    source = source[head * hd : (head + 1) * hd]
                if np.array_equal(value, source):
                    noop.add(k)
                    continue
                ks, values = groups.setdefault((hook, position), ([], []))
                ks.append(k)
                values.append(value)
            # A value already there changes nothing: those rows are the
            # corrupted run's own.
            run = np.array([k for k in range(len(rows)) if k not in noop], dtype=int)
            lp = np.repeat(corrupt["last"][None], len(rows), axis=0)
            if len(run):
                x = block_with_groups(model, layer, x[run], remap(groups, run))
                for i in range(layer + 1, model.blocks):
                    x = model.block(i, x)[0]
                lp[run] = model.log_probs(x[:, -1])
            for k, r in enumerate(rows):
                ld = lp[k, answer] - lp[k, wrong]
                effect = (ld - ld_corrupt) / (ld_clean - ld_corrupt)
                kl = float((p_clean * (clean["last"] - lp[k])).sum())
                key = (index, r["component"], layer, int(r["position"]), r["head"])
                ours[key] = {"ld": float(ld), "effect": float(effect), "kl": kl}
    done = time.perf_counter()

    worst = {"ld": 0.0, "effect": 0.0, "kl": 0.0}
    for r in theirs:
        key = (int(r["pair"]), r["component"], int(r["layer"]), int(r["position"]), r["head"])
        o = ours.get(key)
        if o is None:
            sys.exit(f"probe's row {key} is not the reference's (a pair the reference skipped?)")
        for c in worst:
            worst[c] = max(worst[c], abs(float(r[c]) - o[c]))
    report = {
        "rows": len(theirs),
        "pairs": len(pairs) - len(skipped),
        "skipped": skipped,
        "max_abs_diff": worst,
        "seconds": {"load": loaded - start, "patch": done - loaded},
    }
    text = json.dumps(report, indent=1)
    if args.diff:
        args.diff.write_text(text)
    print(text)


def remap(groups, run):
    """Groups' batch rows renumbered to their places among `run`."""
    place = {k: i for i, k in enumerate(run)}
    return {key: ([place[k] for k in ks], values) for key, (ks, values) in groups.items()}


def block_with_groups(model, layer, x, groups):
    """Block `layer` on x, each (hook, position) group's rows with the
    group's values at that hook and position (one block call per group),
    the other rows as they are."""
    plain = np.ones(len(x), dtype=bool)
    out = np.empty_like(x)
    for (hook, position), (ks, values) in groups.items():
        ks = np.array(ks)
        plain[ks] = False
        patch = {hook: (slice(None), position, np.array(values))}
        out[ks] = model.block(layer, x[ks], patch)[0]
    if plain.any():
        out[plain] = model.block(layer, x[plain])[0]
    return out


if __name__ == "__main__":
    main()
