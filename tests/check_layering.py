#!/usr/bin/env python3
"""Fails when a source folder includes a folder above it.

The folders form layers, lowest first. A folder may include its own headers and those of
folders in lower layers, never a folder of its own layer or above (so no two folders include
each other). Some folders are further restricted to an explicit list: server/ sees the engine
only through its facade (engine/engine.h), its public request types (engine/api/) and the
plan tool; it, the clients and eplb/ may also use base/.

Usage: check_layering.py SOURCE_ROOT
"""
import os
import re
import sys

# Lowest first. A folder's layer is that of the longest listed prefix of its path.
LAYERS = [
    ["base"],  # helpers below everything: bounded JSON, regular files, TLS credentials
    ["kernels"],
    ["kernels/bench", "engine/base", "engine/api"],
    ["engine/trace", "engine/comm", "engine/ops", "engine/pipeline"],
    ["engine/model"],
    ["engine/sampling"],
    ["engine/placement"],
    ["engine/parallel"],
    ["engine/backend"],
    ["engine/backend/cuda"],
    ["engine/runtime"],
    ["engine"],  # the facade: engine/engine.h and what implements it at the top of engine/
    ["engine/tools"],
    ["engine/bench", "eplb"],
    ["server"],
    ["clients"],
    ["tests"],
]

# Folders that may include only these folders of the project (besides their own).
ONLY = {
    "server": {"base", "engine", "engine/api", "engine/pipeline"},
    "clients": {"base"},
    "eplb": {"base"},
}

PROJECT_ROOTS = ("base", "engine", "kernels", "server", "eplb", "clients", "tests")
SOURCE_SUFFIXES = (".h", ".cc", ".cu", ".cuh")
INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"')


def layer_of(folder):
    best, best_layer = None, None
    for index, layer in enumerate(LAYERS):
        for prefix in layer:
            if folder == prefix or folder.startswith(prefix + "/"):
                if best is None or len(prefix) > len(best):
                    best, best_layer = prefix, index
    return best, best_layer


def main():
    root = sys.argv[1] if len(sys.argv) > 1 else "."
    violations = []
    checked = 0
    for top in PROJECT_ROOTS:
        for directory, _, files in os.walk(os.path.join(root, top)):
            for name in files:
                if not name.endswith(SOURCE_SUFFIXES):
                    continue
                path = os.path.join(directory, name)
                relative = os.path.relpath(path, root)
                folder = os.path.dirname(relative)
                own, own_layer = layer_of(folder)
                if own is None:
                    violations.append(f"{relative}: folder {folder} is not in LAYERS")
                    continue
                checked += 1
                with open(path, encoding="utf-8") as source:
                    for number, line in enumerate(source, 1):
                        match = INCLUDE.match(line)
                        if not match or not match.group(1).startswith(PROJECT_ROOTS):
                            continue
                        included = os.path.dirname(match.group(1))
                        target, target_layer = layer_of(included)
                        if target is None or target == own:
                            continue
                        where = f"{relative}:{number}: includes {match.group(1)}"
                        if own in ONLY and target not in ONLY[own]:
                            allowed = ", ".join(sorted(ONLY[own])) or "no other folder"
                            violations.append(f"{where} ({own}/ may include only {allowed})")
                        elif target_layer >= own_layer:
                            violations.append(
                                f"{where} ({target}/ is not below {own}/ in the layering)")
    if violations:
        print("layering violations:")
        for violation in violations:
            print("  " + violation)
        print("the allowed order (lowest first) is in tests/check_layering.py")
        return 1
    print(f"layering: {checked} files, every include goes down")
    return 0


if __name__ == "__main__":
    sys.exit(main())
