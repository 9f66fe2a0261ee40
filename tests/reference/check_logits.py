"""Checks `moeserve logits` against the NumPy reference on the built-in models.

Usage: check_logits.py MOESERVE_BINARY MODEL [MODEL...]
Exports each model's weights with `moeserve export`, runs `moeserve logits` on a fixed token
sequence, and compares with deepseek_reference.forward: max|diff| / max|ref| must be < 1e-4.
"""
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import deepseek_reference  # noqa: E402

TOKENS = [256, 72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100, 33, 10, 200, 3, 77, 90]
TOLERANCE = 1e-4


def check(binary, model, workdir):
    folder = os.path.join(workdir, model.replace(":", "_"))
    subprocess.run([binary, "export", "--model", model, "--out", folder], check=True,
                   stdout=subprocess.DEVNULL)
    out = os.path.join(folder, "logits.npy")
    subprocess.run([binary, "logits", "--model", model, "--tokens", ",".join(map(str, TOKENS)),
                    "--out", out], check=True, stdout=subprocess.DEVNULL)
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    weights = deepseek_reference.load_safetensors(os.path.join(folder, "model.safetensors"))
    expected = deepseek_reference.forward(config, weights, TOKENS)
    actual = np.load(out).astype(np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    error = np.abs(actual - expected).max() / np.abs(expected).max()
    same_argmax = (actual.argmax(-1) == expected.argmax(-1)).mean()
    print(f"{model}: relative error {error:.2e}, argmax agreement {same_argmax:.3f}")
    return error < TOLERANCE


def main():
    binary, models = sys.argv[1], sys.argv[2:]
    with tempfile.TemporaryDirectory() as workdir:
        results = [check(binary, model, workdir) for model in models]
    passed = sum(results)
    print(f"{passed} passed, {len(results) - passed} failed")
    sys.exit(0 if all(results) else 1)


if __name__ == "__main__":
    main()
