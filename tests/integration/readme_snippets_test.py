"""The front-door snippets of README.md and docs/front-doors.md work as written: each code block
after a `<!-- readme-snippet: NAME -->` line runs against a real `moeserve serve` (curl through
bash, Python through this venv's interpreter, which has openai and tritonclient), with the
documented addresses 127.0.0.1:8000 and 127.0.0.1:50051 replaced by the test server's free ports.

Usage: readme_snippets_test.py MOESERVE_BINARY REPO_ROOT
"""
import json
import os
import re
import subprocess
import sys

from moeserve_process import Server, Tally

SNIPPET = re.compile(r"<!-- readme-snippet: (\S+) -->\n```(\w+)\n(.*?)```", re.S)


def snippets(root):
    found = []
    for page in ("README.md", os.path.join("docs", "front-doors.md")):
        with open(os.path.join(root, page), encoding="utf-8") as f:
            found += [(page, *match) for match in SNIPPET.findall(f.read())]
    return found


def run_snippet(server, language, code):
    code = code.replace("127.0.0.1:8000", server.http_url.removeprefix("http://"))
    code = code.replace("127.0.0.1:50051", server.grpc_address)
    command = ["bash", "-euo", "pipefail", "-c", code] if language == "sh" else [sys.executable,
                                                                                 "-c", code]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired as timeout:
        # Say what the snippet had received and what the server was doing, so that a hang can
        # be told apart from a slow machine.
        raise AssertionError(
            f"the snippet did not finish in 120 s; it printed:\n{timeout.stdout}\n{timeout.stderr}\n"
            f"server: running {server.metric('moeserve_running_requests')}, waiting "
            f"{server.metric('moeserve_waiting_requests')}; its last lines:\n"
            + "".join(server.output[-20:])) from None
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    assert done.stdout.strip(), "the snippet printed nothing"
    return done.stdout


def main():
    binary, root = sys.argv[1], sys.argv[2]
    found = snippets(root)
    names = [name for _, name, _, _ in found]
    tally = Tally()

    def check_present():
        assert {"curl", "openai", "tritonclient"} <= set(names), names
    tally.run("snippets present", check_present)
    server = Server(binary)
    try:
        for page, name, language, code in found:
            def check(language=language, code=code, name=name):
                output = run_snippet(server, language, code)
                if name == "curl":
                    answer = json.loads(output)
                    assert answer["choices"][0]["message"]["role"] == "assistant", answer
            tally.run(f"{page}: {name}", check)
    finally:
        server.stop()
    return tally.finish()


if __name__ == "__main__":
    sys.exit(main())
