"""Dumps torch CPU `torch.randn` test vectors for `samplers::rng::TorchGenerator`.

Run with the project venv: /work/pyenv/bin/python tools/make_rng_vectors.py
Writes tests/fixtures/rng/vectors.json. Values are stored as float32 bit patterns (u32) so
the Rust test can demand exact bit equality. Large draws are stored as their first 20 and
last 5 values plus an FNV-1a 64-bit hash over the little-endian bytes of all values.
"""

import json
import os
import platform

import numpy as np
import torch

SEEDS = [0, 1, 42, 2**32 + 5]
SIZES = [7, 15, 16, 17, 4 * 8 * 8, 4 * 13 * 9, 4 * 64 * 64]
# Call sequences on one generator: exercise the cached serial normal (small sizes) that
# survives across calls and is skipped by the block path (sizes >= 16).
SEQUENCES = [
    [7, 16, 7, 17, 1, 1, 3],
    [1, 1, 1, 256, 15, 468, 2],
    [17, 5, 33, 16384, 9],
]
FULL_LIMIT = 64


def fnv1a64(data: bytes) -> int:
    h = 0xCBF29CE484222325
    for b in data:
        h ^= b
        h = (h * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def describe(values: torch.Tensor) -> dict:
    arr = values.contiguous().view(-1).numpy().astype(np.float32)
    bits = arr.view(np.uint32)
    entry = {"n": int(arr.size)}
    if arr.size <= FULL_LIMIT:
        entry["bits"] = [int(b) for b in bits]
    else:
        entry["first_bits"] = [int(b) for b in bits[:20]]
        entry["last_bits"] = [int(b) for b in bits[-5:]]
        entry["fnv1a64"] = f"{fnv1a64(arr.astype('<f4').tobytes()):016x}"
    return entry


def main() -> None:
    cases = []
    for seed in SEEDS:
        for size in SIZES:
            gen = torch.Generator("cpu").manual_seed(seed)
            # Two consecutive calls of the same size: the second shows the stream position.
            calls = [describe(torch.randn(size, generator=gen, dtype=torch.float32)) for _ in range(2)]
            cases.append({"seed": seed, "calls": calls})
        for sequence in SEQUENCES:
            gen = torch.Generator("cpu").manual_seed(seed)
            calls = [describe(torch.randn(size, generator=gen, dtype=torch.float32)) for size in sequence]
            cases.append({"seed": seed, "calls": calls})
    out = {
        "generated_by": "tools/make_rng_vectors.py",
        "torch": torch.__version__,
        "machine": platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cases": cases,
    }
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.join(root, "tests", "fixtures", "rng", "vectors.json")
    with open(path, "w") as f:
        json.dump(out, f, separators=(",", ":"))
        f.write("\n")
    print(f"wrote {path}: {len(cases)} cases")


if __name__ == "__main__":
    main()
