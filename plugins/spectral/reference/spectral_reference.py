#!/usr/bin/env python3
"""Independent reference for the spectral plugin.

Reads a safetensors checkpoint with numpy alone (no probe code), takes the
singular values of every 2-D weight matrix with LAPACK
(np.linalg.svd(W.astype(float64), compute_uv=False)) and computes every
metric of docs/metrics.md ("Weight spectra") from them, written afresh here.
The heavy-tail `alpha_truncated` maximises the likelihood of the power law
bounded at λ_max directly with scipy (probe solves the score equation
instead: same estimator, two different routes). WeightWatcher's own columns
(`alpha` and the rest) come from WeightWatcher itself:
weightwatcher_reference.py.

    spectral_reference.py MODEL_DIR OUT.csv            # reference values
    spectral_reference.py MODEL_DIR --time             # time the SVDs alone (benchmark)

Covers the families whose matrices are stored whole (llama, bert); banks and
fused QKV are checked by the plugin's own tests.
"""

import argparse
import csv
import json
import struct
import sys
import time
from pathlib import Path

import numpy as np

DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64}
NOT_MATRICES = ("norm", "LayerNorm", "bias", "position_ids")


def load(path):
    """Every 2-D float tensor of a safetensors file, as float32 arrays."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    header.pop("__metadata__", None)
    base = 8 + n
    out = {}
    for name, info in sorted(header.items()):
        if len(info["shape"]) != 2 or any(s in name for s in NOT_MATRICES):
            continue
        start, end = info["data_offsets"]
        chunk = raw[base + start : base + end]
        if info["dtype"] == "BF16":
            bits = np.frombuffer(chunk, dtype="<u2").astype(np.uint32) << 16
            array = bits.view(np.float32)
        else:
            array = np.frombuffer(chunk, dtype=DTYPES[info["dtype"]]).astype(np.float32)
        out[name] = array.reshape(info["shape"])
    return out


def truncated_powerlaw_alpha(tail, xmax):
    """MLE of alpha for a power law on [xmin, xmax] by direct maximisation."""
    from scipy.optimize import minimize_scalar

    xmin = tail[0]
    logs = np.log(tail)
    n = len(tail)

    def negative_loglik(alpha):
        b = alpha - 1.0
        if abs(b) < 1e-12:
            log_norm = np.log(np.log(xmax / xmin))
        else:
            # ∫ x^-alpha dx over [xmin, xmax] = (xmin^-b - xmax^-b) / b
            log_norm = np.log((xmin ** (-b) - xmax ** (-b)) / b)
        return alpha * logs.sum() + n * log_norm

    # Unconstrained in practice: a fit below alpha = 1 is possible, and is
    # then out of range (as the powerlaw package flags it).
    result = minimize_scalar(negative_loglik, bounds=(-20.0, 60.0), method="bounded",
                             options={"xatol": 1e-12})
    return result.x


def ks(tail, alpha, xmax):
    xmin = tail[0]
    b = alpha - 1.0
    model = (1 - (tail / xmin) ** (-b)) / (1 - (xmax / xmin) ** (-b))
    # powerlaw's empirical CDF: share strictly below each distinct value
    below = np.searchsorted(tail, tail, side="left") / len(tail)
    return np.max(np.abs(model - below))


def truncated_alpha(sigma):
    """WeightWatcher: λ = σ² above 1e-5, at least 10; xmax = λ_max; x_min by
    KS, among fits with alpha > 1 when there are any (powerlaw's in_range)."""
    evals = np.sort(sigma**2)
    evals = evals[evals > 1e-5]
    if len(evals) < 10:
        return None
    xmax = evals[-1]
    best = None
    for xmin in np.unique(evals)[:-1]:
        tail = evals[evals >= xmin]
        alpha = truncated_powerlaw_alpha(tail, xmax)
        d = ks(tail, alpha, xmax)
        key = (alpha <= 1.0, d)  # in-range fits first, then smallest D
        if best is None or key < best[0]:
            best = (key, alpha)
    return best[1]


def metrics(sigma):
    s = np.sort(np.abs(sigma))[::-1]
    k = len(s)
    energy = np.sum(s**2)
    p = s**2 / energy
    q = s / np.sum(s)
    above = s[s > 1e-6 * s[0]]
    cumulative = np.cumsum(p)
    rank_at = lambda share: int(np.argmax(cumulative >= share - 1e-12)) + 1
    positive = s > 1e-6
    x = np.log(np.arange(1, k + 1)[positive])
    y = np.log(s[positive])
    slope = np.polyfit(x, y, 1)[0] if len(x) >= 2 else None
    alpha = truncated_alpha(s)
    nz_q = q[q > 0]
    nz_p = p[p > 0]
    return {
        "sigma_max": s[0],
        "sigma_min": above[-1],
        "frobenius": np.sqrt(energy),
        "stable_rank": energy / s[0] ** 2,
        "stable_rank_ratio": energy / s[0] ** 2 / k,
        "pr_rank": 1 / np.sum(p**2),
        "pr_rank_ratio": 1 / np.sum(p**2) / k,
        "erank": np.exp(-np.sum(nz_q * np.log(nz_q))),
        "spectral_entropy": -np.sum(nz_p * np.log(nz_p)) / np.log(k),
        "r50": rank_at(0.5),
        "r90": rank_at(0.9),
        "r99": rank_at(0.99),
        "condition": s[0] / above[-1],
        "alpha_loglog": -slope if slope is not None else None,
        "alpha_truncated": alpha,
    }


def power_stable_rank(w, iterations=20):
    """σ₁ by power iteration from v₀ = 1/√n (as probe does), ‖W‖_F² exactly."""
    w = w.astype(np.float64)
    v = np.full(w.shape[1], 1 / np.sqrt(w.shape[1]))
    sigma = 0.0
    for _ in range(iterations):
        u = w @ v
        sigma = np.linalg.norm(u)
        v = w.T @ u
        v /= np.linalg.norm(v)
    sigma = max(np.linalg.norm(w @ v), sigma)
    return np.sum(w * w) / sigma**2


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("model", type=Path)
    parser.add_argument("out", type=Path, nargs="?")
    parser.add_argument("--time", action="store_true", help="time the SVDs alone and print seconds")
    args = parser.parse_args()
    files = sorted(args.model.glob("*.safetensors")) if args.model.is_dir() else [args.model]
    matrices = {}
    for f in files:
        matrices.update(load(f))
    if args.time:
        start = time.perf_counter()
        for w in matrices.values():
            np.linalg.svd(w.astype(np.float64), compute_uv=False)
        print(f"{time.perf_counter() - start:.3f}")
        return
    rows = []
    for name, w in matrices.items():
        sigma = np.linalg.svd(w.astype(np.float64), compute_uv=False)
        row = {"tensor": name, **metrics(sigma), "stable_rank_power": power_stable_rank(w)}
        rows.append(row)
        print(name, file=sys.stderr)
    with open(args.out, "w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if v is None else (repr(float(v)) if not isinstance(v, (str, int)) else v))
                             for k, v in row.items()})


if __name__ == "__main__":
    main()
