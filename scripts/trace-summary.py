#!/usr/bin/env python3
"""Where the steps of a moeserve trace (`serve --trace-dir DIR`) spend their time.

Reads DIR/moeserve-trace.json and prints, per kind of step, each event's mean time per step:
host lanes ("compute", "communication", "gpu wait", "step") and, on GPUs, the "gpu" lane
(each stage's time on the compute stream). Event names are grouped with their layer and
micro-batch numbers replaced by '#'. Steps whose host waited for a routing ("routing wait":
prefill steps, and every step of a group planned on the host) are reported apart from the
others (decode steps planned on the device), since their stages differ. Each kind also gets
the host's own time per step: the forward less the host's waits for the GPU ("gpu wait"
events), which is all a step's host work when it waits for each step's end (a CUDA-graph step,
or a step whose GPU work outlasts the enqueueing).

Usage: scripts/trace-summary.py TRACE.json [--top N]
"""
import argparse
import collections
import json
import re
import sys


def load_events(path):
    with open(path) as f:
        data = json.load(f)
    events = data.get("traceEvents", []) if isinstance(data, dict) else data
    return [e for e in events if e.get("ph") == "X"]


def summarize(events):
    """{kind: (steps, {event key: (events per step, ms per step)})}."""
    steps = sorted((e for e in events if e.get("name") == "forward"),
                   key=lambda e: (e["pid"], e["ts"]))
    by_pid = collections.defaultdict(list)
    for index, step in enumerate(steps):
        by_pid[step["pid"]].append((step["ts"], step["ts"] + step["dur"], index))
    totals = collections.defaultdict(lambda: collections.defaultdict(float))
    counts = collections.defaultdict(collections.Counter)
    waited = set()
    for e in events:
        owner = next((i for start, end, i in by_pid.get(e["pid"], ())
                      if start <= e["ts"] <= end + 1), None)
        if owner is None:
            continue
        key = e.get("cat", "") + ": " + re.sub(r"\d+", "#", e.get("name", ""))
        totals[owner][key] += e.get("dur", 0.0)
        counts[owner][key] += 1
        if e.get("name", "").startswith("routing wait"):
            waited.add(owner)
    result = {}
    for kind, members in (("steps without routing waits", lambda i: i not in waited),
                          ("steps with routing waits", lambda i: i in waited)):
        ids = [i for i in range(len(steps)) if members(i)]
        if not ids:
            continue
        table = {}
        for key in {k for i in ids for k in totals[i]}:
            table[key] = (sum(counts[i][key] for i in ids) / len(ids),
                          sum(totals[i][key] for i in ids) / 1000.0 / len(ids))
        result[kind] = (len(ids), table)
    return result


def host_time(table):
    """(forward ms, ms waiting for the GPU) per step, from a kind of step's table."""
    forward = table.get("step: forward", (0, 0.0))[1]
    waited = sum(ms for key, (_, ms) in table.items() if key.startswith("gpu wait: "))
    return forward, waited


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace", help="a trace written by --trace-dir (moeserve-trace.json)")
    parser.add_argument("--top", type=int, default=30, help="events to list per kind of step")
    args = parser.parse_args()
    try:
        events = load_events(args.trace)
    except (OSError, ValueError) as error:
        sys.exit(f"trace-summary: cannot read {args.trace}: {error}")
    summary = summarize(events)
    if not summary:
        sys.exit(f"trace-summary: {args.trace} holds no steps ('forward' events)")
    for kind, (count, table) in summary.items():
        print(f"{kind}: {count}")
        forward, waited = host_time(table)
        if forward > 0:
            print(f"  host time {forward - waited:.3f} ms per step: forward {forward:.3f} ms less "
                  f"{waited:.3f} ms waiting for the GPU ({100 * (forward - waited) / forward:.1f}%)")
        print(f"  {'event (lane: name)':56s} {'per step':>9s} {'ms per step':>12s}")
        for key, (per_step, ms) in sorted(table.items(), key=lambda kv: -kv[1][1])[:args.top]:
            print(f"  {key:56s} {per_step:9.2f} {ms:12.3f}")


if __name__ == "__main__":
    main()
