#!/usr/bin/env python3
"""An independent computation of the contrastive plugin's table, in numpy f64.

It shares no code with probe: the text goes through the `tokenizers` Python
package and the chat template through jinja2, the forward pass is the numpy
model of fixtures/reference/forward_reference.py, and every measure (cosine,
relative distance, logit-lens KL both ways, linear CKA) is computed here from
those hidden states.

    contrastive_reference.py MODEL_DIR SET.json                  # the table, CSV on stdout
    contrastive_reference.py MODEL_DIR SET.json --probe T.csv    # compare with probe's table (CSV)
    contrastive_reference.py MODEL_DIR SET.json --time           # seconds of the computation alone
    contrastive_reference.py MODEL_DIR SET.json --time --probe T.csv --diff D.json   # both, the comparison in D.json

`cargo xtask bench contrastive` runs it against probe on SmolLM2 (decoders
of the llama family: the numpy model covers llama, qwen2, qwen3, gemma3).
Needs numpy, tokenizers and jinja2 (the bench installs them in .cache/py).
"""

import argparse
import csv
import io
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "fixtures" / "reference"))
import forward_reference as fr  # noqa: E402

COLUMNS = ["group", "label_a", "label_b", "layer", "divergence_position", "cosine", "distance", "kl_ab", "kl_ba", "cka"]


def encoder(model):
    import jinja2
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model / "tokenizer.json"))
    config_path = model / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.exists() else {}
    template = config.get("chat_template")

    def token_text(value):
        return value.get("content", "") if isinstance(value, dict) else (value or "")

    def encode(prompt, completion, chat):
        if chat and isinstance(template, str):
            rendered = jinja2.Environment().from_string(template).render(
                messages=[{"role": "user", "content": prompt}],
                add_generation_prompt=True,
                bos_token=token_text(config.get("bos_token")),
                eos_token=token_text(config.get("eos_token")),
            )
            head = tok.encode(rendered, add_special_tokens=False).ids
        else:
            head = tok.encode(prompt, add_special_tokens=True).ids
        return head + tok.encode(completion, add_special_tokens=False).ids, len(head)

    return encode


def log_softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def linear_cka(x, y):
    x = x - x.mean(axis=0)
    y = y - y.mean(axis=0)
    k, l = x @ x.T, y @ y.T
    return float((k * l).sum() / (np.linalg.norm(k) * np.linalg.norm(l)))


def table(model, groups, chat):
    weights, config = fr.load(model)
    family = config.get("model_type", "llama")
    encode = encoder(model)
    eps = config["rms_norm_eps"]
    head = weights.get("lm_head.weight", weights["model.embed_tokens.weight"])
    gemma = family == "gemma3"
    rows = []
    for group in groups:
        passes = []
        for c in group["completions"]:
            tokens, prompt_len = encode(group["prompt"], c["text"], chat)
            stages, _ = fr.llama_like(weights, config, family, tokens)
            passes.append((tokens, prompt_len, np.stack(stages)))
        completions = group["completions"]
        for i in range(len(completions)):
            for j in range(i + 1, len(completions)):
                (ta, pa, sa), (tb, _, sb) = passes[i], passes[j]
                d = next(p for p, (x, y) in enumerate(zip(ta, tb)) if x != y)
                a, b = sa[:, d, :], sb[:, d, :]
                la = log_softmax(fr.rms(a, weights["model.norm.weight"], eps, gemma) @ head.T)
                lb = log_softmax(fr.rms(b, weights["model.norm.weight"], eps, gemma) @ head.T)
                kl_ab = (np.exp(la) * (la - lb)).sum(axis=-1)
                kl_ba = (np.exp(lb) * (lb - la)).sum(axis=-1)
                common = min(len(ta), len(tb)) - pa
                for stage in range(sa.shape[0]):
                    x, y = a[stage], b[stage]
                    nx, ny = np.linalg.norm(x), np.linalg.norm(y)
                    cka = (
                        linear_cka(sa[stage, pa : pa + common], sb[stage, pa : pa + common])
                        if common >= 3
                        else math.nan
                    )
                    rows.append(
                        {
                            "group": group["id"],
                            "label_a": completions[i]["label"],
                            "label_b": completions[j]["label"],
                            "layer": stage - 1,
                            "divergence_position": d,
                            "cosine": float(x @ y / (nx * ny)),
                            "distance": float(np.linalg.norm(x - y) / (0.5 * (nx + ny))),
                            "kl_ab": float(kl_ab[stage]),
                            "kl_ba": float(kl_ba[stage]),
                            "cka": cka,
                        }
                    )
    return rows


def compare(rows, probe_csv):
    with open(probe_csv, newline="") as f:
        theirs = {(r["group"], r["label_a"], r["label_b"], int(r["layer"])): r for r in csv.DictReader(f)}
    worst = {c: 0.0 for c in COLUMNS[4:]}
    relative = {c: 0.0 for c in ("kl_ab", "kl_ba")}
    for r in rows:
        key = (r["group"], r["label_a"], r["label_b"], r["layer"])
        if key not in theirs:
            raise SystemExit(f"{probe_csv}: no row for {key}")
        p = theirs[key]
        for c in worst:
            if c == "divergence_position":
                if int(p[c]) != r[c]:
                    raise SystemExit(f"{key}: divergence {p[c]} != {r[c]}")
                continue
            ours = float(p[c]) if p[c] != "" else math.nan
            if math.isnan(ours) and math.isnan(r[c]):
                continue
            worst[c] = max(worst[c], abs(ours - r[c]))
            if c in relative and r[c] > 1e-3:
                relative[c] = max(relative[c], abs(ours - r[c]) / r[c])
    if len(theirs) != len(rows):
        raise SystemExit(f"{probe_csv}: {len(theirs)} rows, the reference has {len(rows)}")
    del worst["divergence_position"]
    return {"rows": len(rows), "max_abs_diff": worst, "max_rel_diff_kl_above_1e-3": relative}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("set", type=Path)
    parser.add_argument("--no-chat", action="store_true", help="plain text, as probe's chat=false")
    parser.add_argument("--groups", type=int, help="the first N groups only")
    parser.add_argument("--probe", type=Path, help="probe's table as CSV, to compare against")
    parser.add_argument("--diff", type=Path, help="with --probe: write the comparison here, not to stdout")
    parser.add_argument("--time", action="store_true", help="print the computation's seconds only")
    args = parser.parse_args()
    groups = json.loads(args.set.read_text())["groups"][: args.groups]
    start = time.perf_counter()
    rows = table(args.model, groups, not args.no_chat)
    seconds = time.perf_counter() - start
    if args.probe:
        report = json.dumps(compare(rows, args.probe), indent=1)
        if args.diff:
            args.diff.write_text(report)
        else:
            print(report)
    if args.time:
        print(f"{seconds:.3f}")
    elif not args.probe:
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
        sys.stdout.write(out.getvalue())


if __name__ == "__main__":
    main()
