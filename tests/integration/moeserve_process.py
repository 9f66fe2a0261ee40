"""Starts the real `moeserve serve` on loopback with free ports for the Python front-door tests,
and small helpers they share (metrics, a pass/fail tally).

Used by openai_client_test.py and kserve_client_test.py; not thread-safe.
"""
import re
import signal
import subprocess
import threading
import time
import traceback
import urllib.request

READY = re.compile(r"serving \S+ on ([0-9.]+):(\d+) \(metrics on (?:[0-9.]+:(\d+)|disabled), "
                   r"OpenAI HTTP on (?:[0-9.]+:(\d+)|off)")


class Server:
    """`moeserve serve --port 0 --metrics-port 0 --http-port 0 ARGS`, stopped with SIGTERM."""

    def __init__(self, binary, *args):
        self.process = subprocess.Popen(
            [binary, "serve", "--port", "0", "--metrics-port", "0", "--http-port", "0", *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.output = []
        deadline = time.time() + 60
        match = None
        while time.time() < deadline and match is None:
            line = self.process.stdout.readline()
            if not line:
                break
            self.output.append(line)
            match = READY.search(line)
        if match is None:
            self.stop()
            raise RuntimeError("moeserve did not become ready:\n" + "".join(self.output))
        self.grpc_address = f"{match.group(1)}:{match.group(2)}"
        self.metrics_port = int(match.group(3))
        self.http_url = f"http://127.0.0.1:{match.group(4)}"
        # Keep draining the output so the server never blocks on a full pipe.
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()

    def _drain(self):
        for line in self.process.stdout:
            self.output.append(line)

    def metric(self, series):
        """The first sample of `series` on /metrics (-1 when absent)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics",
                                    timeout=10) as response:
            for line in response.read().decode().splitlines():
                if line.startswith(series + " ") or line.startswith(series + "{"):
                    return float(line.rsplit(" ", 1)[1])
        return -1.0

    def wait_idle(self, timeout):
        """Waits until no request runs or waits and the KV cache is empty; whether it did."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if (self.metric("moeserve_running_requests") == 0
                    and self.metric("moeserve_waiting_requests") == 0
                    and self.metric("moeserve_kv_cache_usage_ratio") == 0):
                return True
            time.sleep(0.05)
        return False

    def stop(self):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class Tally:
    """Runs named checks, printing each failure, and ends with 'N passed, N failed'."""

    def __init__(self):
        self.passed = 0
        self.failed = 0

    def run(self, name, check, *args):
        started = time.time()
        try:
            check(*args)
            self.passed += 1
            print(f"PASS {name} ({time.time() - started:.2f} s)", flush=True)
        except Exception:  # noqa: BLE001 - every failure is reported, then the next check runs
            self.failed += 1
            print(f"FAIL {name}\n{traceback.format_exc()}", flush=True)

    def finish(self):
        print(f"{self.passed} passed, {self.failed} failed")
        return 1 if self.failed else 0
