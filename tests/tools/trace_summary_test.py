#!/usr/bin/env python3
"""scripts/trace-summary.py on a trace in the format TraceRecorder writes."""
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import unittest

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "..", "scripts", "trace-summary.py")
spec = importlib.util.spec_from_file_location("trace_summary", SCRIPT)
trace_summary = importlib.util.module_from_spec(spec)
spec.loader.exec_module(trace_summary)


def event(name, cat, ts, dur, pid=1, tid=0):
    return {"ph": "X", "name": name, "cat": cat, "pid": pid, "tid": tid, "ts": ts, "dur": dur}


TRACE = {"traceEvents": [
    {"ph": "M", "name": "thread_name", "pid": 1, "tid": 3, "args": {"name": "GPU"}},
    # Two decode steps of rank 1, one prefill step (it waited for a routing).
    event("forward", "step", 0, 1000, tid=2),
    event("attention L0 mb0", "gpu", 100, 300, tid=3),
    event("attention L1 mb0", "gpu", 400, 100, tid=3),
    event("forward", "step", 2000, 1000, tid=2),
    event("attention L0 mb0", "gpu", 2100, 200, tid=3),
    event("forward", "step", 4000, 3000, tid=2),
    event("routing wait L1 mb0", "gpu wait", 4100, 2000),
    # Rank 2's step at the same time as rank 1's first: its own.
    event("forward", "step", 0, 500, pid=2, tid=2),
    event("attention L0 mb0", "gpu", 10, 50, pid=2, tid=3),
    # Outside every step: not counted.
    event("LM head", "gpu", 9000, 10, tid=3),
]}


class TraceSummaryTest(unittest.TestCase):
    def test_steps_are_split_by_routing_waits_and_averaged(self):
        events = [e for e in TRACE["traceEvents"] if e["ph"] == "X"]
        summary = trace_summary.summarize(events)
        decode_count, decode = summary["steps without routing waits"]
        self.assertEqual(decode_count, 3)  # two of rank 1, one of rank 2
        per_step, ms = decode["gpu: attention L# mb#"]
        self.assertAlmostEqual(per_step, 4 / 3)
        self.assertAlmostEqual(ms, (0.3 + 0.1 + 0.2 + 0.05) / 3)
        self.assertNotIn("gpu: LM head", decode)
        prefill_count, prefill = summary["steps with routing waits"]
        self.assertEqual(prefill_count, 1)
        self.assertAlmostEqual(prefill["gpu wait: routing wait L# mb#"][1], 2.0)
        # The host's own time: the forward less its waits for the GPU.
        self.assertEqual(trace_summary.host_time(prefill), (3.0, 2.0))
        forward, waited = trace_summary.host_time(decode)
        self.assertAlmostEqual(forward, (1.0 + 1.0 + 0.5) / 3)
        self.assertEqual(waited, 0.0)

    def test_command_prints_tables_and_refuses_bad_input(self):
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "moeserve-trace.json")
            with open(path, "w") as f:
                json.dump(TRACE, f)
            out = subprocess.run([sys.executable, SCRIPT, path], capture_output=True, text=True,
                                 check=True).stdout
            self.assertIn("steps without routing waits: 3", out)
            self.assertIn("gpu: attention L# mb#", out)
            self.assertIn("host time 1.000 ms per step: forward 3.000 ms less 2.000 ms waiting "
                          "for the GPU (33.3%)", out)
            empty = os.path.join(folder, "empty.json")
            with open(empty, "w") as f:
                json.dump({"traceEvents": []}, f)
            failed = subprocess.run([sys.executable, SCRIPT, empty], capture_output=True,
                                    text=True)
            self.assertNotEqual(failed.returncode, 0)
            self.assertIn("holds no steps", failed.stderr)
            missing = subprocess.run([sys.executable, SCRIPT, os.path.join(folder, "none.json")],
                                     capture_output=True, text=True)
            self.assertNotEqual(missing.returncode, 0)
            self.assertIn("cannot read", missing.stderr)


if __name__ == "__main__":
    unittest.main()
