"""numpy's float32 round-to-nearest on rows the quant plugin's unit test
replays: symmetric per-group scale = max|w| / (2^(b-1) - 1), q = clip(
round(w / scale), -2^(b-1), 2^(b-1) - 1), w' = q * scale, ties to even
(numpy.round), a group of zeros left at zero. Writes
quantize_reference.json beside this file (values as float32 bit patterns).

    python3 plugins/quant/reference/quantize_reference.py
"""
import json
import pathlib

import numpy as np


def quantize(row, bits, group):
    qmax = np.float32(2 ** (bits - 1) - 1)
    qmin = np.float32(-(2 ** (bits - 1)))
    out = row.copy()
    for start in range(0, len(row), group):
        g = row[start:start + group]
        m = np.max(np.abs(g))
        if m == 0:
            continue
        scale = np.float32(m / qmax)
        out[start:start + group] = np.clip(np.round(g / scale), qmin, qmax) * scale
    return out


def main():
    rng = np.random.default_rng(7)
    cases = []
    for length, group in [(37, 8), (260, 128)]:
        for bits in [2, 3, 4, 8]:
            row = (rng.standard_normal(length) * 0.05).astype(np.float32)
            row[8:16] = 0.0  # a whole group of zeros (group 8)
            row[16:20] = np.array([1.0, 0.5, -0.5, 0.25], dtype=np.float32)
            q = quantize(row, bits, group)
            assert q.dtype == np.float32
            cases.append({
                "bits": bits,
                "group": group,
                "row": [int(v) for v in row.view(np.uint32)],
                "quantized": [int(v) for v in q.view(np.uint32)],
            })
    out = pathlib.Path(__file__).with_name("quantize_reference.json")
    out.write_text(json.dumps({"numpy": np.__version__, "cases": cases}) + "\n")
    print(f"wrote {out} ({len(cases)} cases)")


if __name__ == "__main__":
    main()
