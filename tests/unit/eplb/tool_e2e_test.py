#!/usr/bin/python3
"""End-to-end test of the real `moeserve-eplb` binary: the published example, an invalid line
among valid ones, --summary, standard input/output, exit codes and --help.

Usage: tool_e2e_test.py PATH/TO/moeserve-eplb   (ctest passes the built binary)
Only the Python standard library is used.
"""

import json
import os
import subprocess
import sys
import tempfile

EXAMPLE = {
    "id": "published-example",
    "weight": [[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
               [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]],
    "num_replicas": 16, "num_groups": 4, "num_nodes": 2, "num_gpus": 8,
}
EXAMPLE_PHY2LOG = [[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
                   [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]]
# 3 groups on 2 nodes: global policy; worked out by hand in tests/unit/eplb/rebalance_test.cc.
GLOBAL = {"id": 42, "weight": [[8, 4, 2, 2]],
          "num_replicas": 6, "num_groups": 3, "num_nodes": 2, "num_gpus": 2}

failures = []


def check(condition, message):
    if not condition:
        failures.append(message)
        print("FAIL:", message, file=sys.stderr)


def run(tool, *arguments, stdin=None):
    return subprocess.run([tool, *arguments], input=stdin, capture_output=True, text=True,
                          timeout=60)


def check_plan(result, case):
    """Checks a result line against the invariants every placement has."""
    num_experts = len(case["weight"][0])
    for layer, slots in enumerate(result["phy2log"]):
        check(len(slots) == case["num_replicas"], f"layer {layer}: phy2log has {len(slots)} slots")
        counts = [slots.count(expert) for expert in range(num_experts)]
        check(result["logcnt"][layer] == counts, f"layer {layer}: logcnt disagrees with phy2log")
        for expert, row in enumerate(result["log2phy"][layer]):
            live = [slot for slot in row if slot != -1]
            check(len(live) == counts[expert] and all(slots[s] == expert for s in live),
                  f"layer {layer} expert {expert}: log2phy {row} disagrees with phy2log")


def controller(tool, token_file, *arguments):
    """The controller for one cycle against addresses where nothing listens."""
    return run(tool, "controller", "--prometheus-url", "http://127.0.0.1:1", "--targets",
               "127.0.0.1:1", "--admin-token-file", token_file, "--once", *arguments)


def check_controller_refuses_bad_flags(tool):
    """Values that used to be accepted: an infinite window (a PromQL range of -2^63 s), a NaN
    threshold (every comparison false, so it always pushed), and their relatives."""
    with tempfile.TemporaryDirectory() as directory:
        token_file = os.path.join(directory, "token")
        with open(token_file, "w") as token:
            token.write("0f3a9c2e7b5d1f8a4c6e0b2d9f7a5c3e\n")
        for flag, value in [("--window", "inf"), ("--window", "nan"), ("--window", "1e9"),
                            ("--window", "-5m"), ("--window", "0s"), ("--window", "31000h"),
                            ("--interval", "inf"), ("--interval", "0.1s"),
                            ("--min-improvement", "nan"), ("--min-improvement", "inf"),
                            ("--min-improvement", "-0.1"), ("--min-improvement", "1.5"),
                            ("--num-nodes", "0"), ("--num-gpus", "-1"), ("--metrics-port", "70000")]:
            completed = controller(tool, token_file, flag, value)
            check(completed.returncode >= 100 and flag in completed.stderr,
                  f"controller {flag} {value} must be refused as a bad command line: "
                  f"{completed.returncode} {completed.stderr}")


def check_controller_metrics_port_taken(tool):
    """A --metrics-port another process holds is a message and exit 2, not SIGABRT."""
    import socket
    with tempfile.TemporaryDirectory() as directory, socket.socket() as holder:
        token_file = os.path.join(directory, "token")
        with open(token_file, "w") as token:
            token.write("0f3a9c2e7b5d1f8a4c6e0b2d9f7a5c3e\n")
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        completed = controller(tool, token_file, "--metrics-host", "127.0.0.1", "--metrics-port",
                               str(port))
        check(completed.returncode == 2 and "cannot serve metrics on 127.0.0.1:" in completed.stderr,
              f"metrics port in use: {completed.returncode} {completed.stderr}")


def main():
    tool = sys.argv[1]
    with tempfile.TemporaryDirectory() as directory:
        input_path = os.path.join(directory, "cases.jsonl")
        output_path = os.path.join(directory, "placements.jsonl")
        with open(input_path, "w") as cases:
            cases.write(json.dumps(EXAMPLE) + "\n")
            cases.write('{"id": "bad", "weight": [[1, -2, 3, 4]], "num_replicas": 4,'
                        ' "num_groups": 1, "num_nodes": 1, "num_gpus": 2}\n')
            cases.write("\n")  # blank lines are skipped
            cases.write("this is not json\n")
            cases.write(json.dumps(GLOBAL) + "\n")

        completed = run(tool, "rebalance", "--input", input_path, "--output", output_path,
                        "--summary")
        check(completed.returncode == 1, f"exit status {completed.returncode}, want 1 "
                                         f"(some cases invalid); stderr: {completed.stderr}")
        check("2 of 4 cases were invalid" in completed.stderr, "stderr counts invalid cases")
        results = []
        try:
            with open(output_path) as placements:
                results = [json.loads(line) for line in placements]
        except (OSError, ValueError) as error:
            check(False, f"cannot read the output file: {error}")
        check(len(results) == 4, f"{len(results)} output lines, want 4")
        if len(results) == 4:
            example, bad, broken, global_case = results
            check(example["id"] == "published-example", "first line keeps its id")
            check(example["phy2log"] == EXAMPLE_PHY2LOG,
                  f"published example: got phy2log {example.get('phy2log')}")
            check_plan(example, EXAMPLE)
            check(set(bad) == {"id", "error"} and bad["id"] == "bad", f"error line: {bad}")
            check("weight[0][1] is -2" in bad.get("error", ""), f"error message: {bad}")
            check(broken["id"] is None and "invalid JSON" in broken.get("error", ""),
                  f"unparsable line: {broken}")
            check(global_case["id"] == 42, "numeric id echoed")
            check(global_case.get("phy2log") == [[1, 0, 3, 0, 0, 2]],
                  f"global case: {global_case}")
            check(global_case.get("log2phy") == [[[3, 4, 1], [0, -1, -1], [5, -1, -1],
                                                  [2, -1, -1]]], f"global case: {global_case}")
            check_plan(global_case, GLOBAL)
        check("case \"published-example\": hierarchical policy" in completed.stdout,
              f"summary header missing: {completed.stdout}")
        check("   mean " in completed.stdout, "summary has the mean row")

        # Standard input to standard output: JSON only on stdout, summary on stderr.
        completed = run(tool, "rebalance", "--input", "-", "--output", "-", "--summary",
                        stdin=json.dumps(EXAMPLE) + "\n")
        check(completed.returncode == 0, f"stdin/stdout run exited {completed.returncode}")
        lines = completed.stdout.splitlines()
        check(len(lines) == 1 and json.loads(lines[0])["phy2log"] == EXAMPLE_PHY2LOG,
              f"stdout must hold exactly the result line: {completed.stdout!r}")
        check("balancedness" in completed.stderr, "summary goes to stderr with --output -")

        completed = run(tool, "rebalance", "--input", os.path.join(directory, "missing.jsonl"),
                        "--output", output_path)
        check(completed.returncode == 2 and "cannot open input" in completed.stderr,
              f"missing input: {completed.returncode} {completed.stderr}")
        completed = run(tool, "rebalance", "--input", input_path, "--output",
                        os.path.join(directory, "no-such-dir", "out.jsonl"))
        check(completed.returncode == 2 and "cannot open output" in completed.stderr,
              f"unwritable output: {completed.returncode} {completed.stderr}")

    completed = run(tool, "rebalance", "--input", "x.jsonl")
    check(completed.returncode != 0 and "--output" in completed.stderr,
          f"missing --output must be an error: {completed.returncode} {completed.stderr}")
    completed = run(tool)
    check(completed.returncode != 0, "no subcommand must be an error")
    completed = run(tool, "--help")
    check(completed.returncode == 0 and "rebalance" in completed.stdout, "--help lists rebalance")
    completed = run(tool, "rebalance", "--help")
    check(completed.returncode == 0 and "--summary" in completed.stdout
          and "Exit status" in completed.stdout, "rebalance --help documents flags and exits")

    check_controller_refuses_bad_flags(tool)
    check_controller_metrics_port_taken(tool)

    if failures:
        print(f"{len(failures)} check(s) failed", file=sys.stderr)
        return 1
    print("moeserve-eplb end-to-end: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
