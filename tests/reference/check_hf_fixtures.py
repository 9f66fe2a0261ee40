"""Checks `moeserve logits` on the Hugging Face parity fixtures against transformers' logits.

Usage: check_hf_fixtures.py MOESERVE_BINARY FIXTURE_FOLDER

FIXTURE_FOLDER is what tests/fixtures/make_hf_fixtures.py wrote (tests/fixtures/hf): its
manifest.json lists each fixture folder, the prompt and the tolerance. For each fixture,
max|diff| / max|ref| of `moeserve logits --model FOLDER` against reference_logits.npy must be
below the fixture's tolerance (1e-4). A missing fixture folder is a failure, not a skip.
"""
import json
import os
import subprocess
import sys
import tempfile

import numpy as np


def main():
    binary, fixtures = sys.argv[1], sys.argv[2]
    manifest_path = os.path.join(fixtures, "manifest.json")
    if not os.path.exists(manifest_path):
        print(f"FAILED: {manifest_path} is missing; run tests/fixtures/make_hf_fixtures.py {fixtures} "
              "on a machine with torch and transformers and commit its output")
        print("0 passed, 1 failed")
        sys.exit(1)
    with open(manifest_path) as f:
        manifest = json.load(f)
    prompt = manifest["prompt_tokens"]
    results = []
    with tempfile.TemporaryDirectory() as workdir:
        for fixture in manifest["fixtures"]:
            folder = os.path.join(fixtures, fixture["folder"])
            out = os.path.join(workdir, fixture["name"] + ".npy")
            run = subprocess.run([binary, "logits", "--model", folder, "--tokens", ",".join(map(str, prompt)),
                                  "--out", out], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            if run.returncode != 0:
                print(f"{fixture['name']}: moeserve failed: {run.stderr.strip()}")
                results.append(False)
                continue
            expected = np.load(os.path.join(folder, "reference_logits.npy")).astype(np.float64)
            actual = np.load(out).astype(np.float64)
            if actual.shape != expected.shape:
                print(f"{fixture['name']}: shape {actual.shape}, expected {expected.shape}")
                results.append(False)
                continue
            error = np.abs(actual - expected).max() / np.abs(expected).max()
            agreement = (actual.argmax(-1) == expected.argmax(-1)).mean()
            ok = error < fixture["tolerance"]
            print(f"{fixture['name']} ({fixture['model_type']}, {fixture['weights_dtype']}, "
                  f"{fixture['stored_layout']}): relative error {error:.2e} "
                  f"(tolerance {fixture['tolerance']:.0e}), argmax agreement {agreement:.3f}"
                  + ("" if ok else "  FAILED"))
            results.append(ok)
    passed = sum(results)
    print(f"{passed} passed, {len(results) - passed} failed")
    sys.exit(0 if results and all(results) else 1)


if __name__ == "__main__":
    main()
