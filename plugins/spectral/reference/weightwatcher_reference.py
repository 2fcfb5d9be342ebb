#!/usr/bin/env python3
"""WeightWatcher 0.7.7 itself on a safetensors model folder: its `analyze()`
with every default, the per-layer columns probe's spectral table shares
with it, as CSV (one row per matrix, named as probe names the tensor).

    pip install --target .cache/ww weightwatcher==0.7.7
    PYTHONPATH=.cache/ww python3 weightwatcher_reference.py MODEL_DIR OUT.csv

WeightWatcher reads safetensors through `safe_open(..., framework="pt")` and
compares tensors against `torch.Tensor`, so it needs torch even for files
it reads as numpy. Without torch installed, two patches stand in for it
(nothing else is changed): `safe_open` reads with framework="numpy", and
the module's `torch` is a stand-in whose `Tensor` and layer classes
nothing is an instance of — which is what those comparisons find for numpy
arrays anyway. The SVDs are then scipy's (LAPACK, float64), WeightWatcher's
own choice without torch.

The committed CSVs beside this script are its output on SmolLM2-135M-Instruct
and all-MiniLM-L6-v2 (AMD EPYC, 2 cores, 2026-12-05); the integration test
`spectral::smollm2_agrees_with_numpy_lapack` (and MiniLM's) compares every
column on every matrix.
"""

import sys
import time
import types

import weightwatcher as ww
import weightwatcher.weightwatcher as wwmod
from safetensors import safe_open

COLUMNS = [
    "alpha",
    "alpha_weighted",
    "xmin",
    "xmax",
    "D",
    "sigma",
    "num_pl_spikes",
    "num_evals",
    "log_norm",
    "log_spectral_norm",
    "log_alpha_norm",
    "stable_rank",
    "entropy",
    "rank_loss",
    "warning",
]


class _NoTensor:
    """Nothing is an instance of it."""


def without_torch():
    layers = types.SimpleNamespace(
        Linear=_NoTensor, Conv1d=_NoTensor, Conv2d=_NoTensor, Embedding=_NoTensor
    )
    wwmod.torch = types.SimpleNamespace(Tensor=_NoTensor, nn=layers)
    wwmod.safe_open = lambda path, framework="pt", device="cpu": safe_open(path, framework="numpy")


def main():
    model, out = sys.argv[1], sys.argv[2]
    try:
        import torch  # noqa: F401
    except ImportError:
        without_torch()
    start = time.perf_counter()
    details = ww.WeightWatcher(model=model).analyze()
    seconds = time.perf_counter() - start
    details["tensor"] = details["longname"] + ".weight"
    details[["tensor"] + COLUMNS].to_csv(out, index=False, float_format="%.17g")
    print(f"{len(details)} layers in {seconds:.1f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
