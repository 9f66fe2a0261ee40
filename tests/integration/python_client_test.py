"""The Python example client against a real server on loopback.

Usage: python_client_test.py MOESERVE_BINARY REPO_ROOT
"""
import os
import re
import signal
import subprocess
import sys
import time


def main():
    binary, root = sys.argv[1], sys.argv[2]
    server = subprocess.Popen([binary, "serve", "--port", "0", "--metrics-port", "-1",
                               "--http-port", "-1"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    failures = []
    try:
        address = None
        deadline = time.time() + 60
        while time.time() < deadline and address is None:
            line = server.stdout.readline()
            match = re.search(r"serving \S+ on ([0-9.]+:\d+)", line)
            if match:
                address = match.group(1)
        if address is None:
            print("FAIL server did not become ready")
            sys.exit(1)
        client = os.path.join(root, "clients", "python", "generate.py")
        ok = subprocess.run([sys.executable, client, "--addr", address, "--text", "hello",
                             "--max-tokens", "8"], capture_output=True, text=True, timeout=120)
        if ok.returncode != 0 or "FINISH_REASON_LENGTH: 8 tokens" not in ok.stderr:
            failures.append(f"generate: rc {ok.returncode}, stderr {ok.stderr[-500:]}")
        if "model builtin:tiny (deepseek_v3)" not in ok.stderr:
            failures.append("model info line missing")
        bad = subprocess.run([sys.executable, client, "--addr", address, "--text", "",
                              "--max-tokens", "8"], capture_output=True, text=True, timeout=120)
        if bad.returncode == 0 or "INVALID_ARGUMENT" not in bad.stderr:
            failures.append(f"empty text: rc {bad.returncode}, stderr {bad.stderr[-300:]}")
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
    for failure in failures:
        print("FAIL", failure)
    print(f"{max(0, 3 - len(failures))} passed, {len(failures)} failed")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
