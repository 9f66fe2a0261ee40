"""Placement never changes the math: `moeserve logits --ep N` equals `--ep 1`.

Usage: check_ep_invariance.py MOESERVE_BINARY
For N = 2, 4, 8, 32, 128, with and without redundant experts and two-batch overlap, and with
non-default placement files, the logits must match the single-rank logits within a relative
error (max |diff| / max |ref|) of 1e-5.
"""
import json
import os
import random
import subprocess
import sys
import tempfile

import numpy as np

MODEL = "builtin:tiny-e256"  # 256 experts: EP128 works without redundant experts
NUM_EXPERTS = 256
NUM_MOE_LAYERS = 3
TOKENS = [256] + [ord(c) for c in "Expert parallelism must not change the logits."]
TOLERANCE = 1e-5


def logits(binary, workdir, name, *flags):
    out = os.path.join(workdir, name + ".npy")
    command = [binary, "logits", "--model", MODEL, "--tokens", ",".join(map(str, TOKENS)),
               "--out", out, *flags]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return np.load(out).astype(np.float64)


def random_placement(path, num_slots, seed):
    """Every expert once plus random replicas, slots shuffled per layer."""
    rng = random.Random(seed)
    phy2log = []
    for _ in range(NUM_MOE_LAYERS):
        slots = list(range(NUM_EXPERTS)) + [rng.randrange(NUM_EXPERTS)
                                            for _ in range(num_slots - NUM_EXPERTS)]
        rng.shuffle(slots)
        phy2log.append(slots)
    with open(path, "w") as f:
        json.dump({"version": 7, "phy2log": phy2log}, f)


def main():
    binary = sys.argv[1]
    passed = failed = 0
    with tempfile.TemporaryDirectory() as workdir:
        reference = logits(binary, workdir, "ep1")
        scale = np.abs(reference).max()
        cases = []
        for ep in (2, 4, 8, 32, 128):
            redundant = ep  # one more slot per rank
            cases += [
                (f"ep{ep}", ["--ep", str(ep)]),
                (f"ep{ep}+redundant{redundant}",
                 ["--ep", str(ep), "--num-redundant-experts", str(redundant)]),
                (f"ep{ep}+overlap", ["--ep", str(ep), "--two-batch-overlap"]),
                (f"ep{ep}+redundant{redundant}+overlap",
                 ["--ep", str(ep), "--num-redundant-experts", str(redundant),
                  "--two-batch-overlap"]),
            ]
        for ep, slots in ((8, 264), (32, 320), (128, 384)):
            path = os.path.join(workdir, f"placement{ep}.json")
            random_placement(path, slots, seed=ep)
            cases.append((f"ep{ep}+placement({slots} slots)+overlap",
                          ["--ep", str(ep), "--num-redundant-experts", str(slots - NUM_EXPERTS),
                           "--placement", path, "--two-batch-overlap"]))
        for name, flags in cases:
            actual = logits(binary, workdir, f"case{passed + failed}", *flags)
            error = np.abs(actual - reference).max() / scale
            ok = actual.shape == reference.shape and error < TOLERANCE
            print(f"{'ok  ' if ok else 'FAIL'} {name}: relative error {error:.2e}")
            passed += ok
            failed += not ok
    print(f"{passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
