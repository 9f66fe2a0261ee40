"""checkov on every rendered kustomization and on both Dockerfiles, hadolint on both
Dockerfiles: no failed check, and every skipped check carries its reason (checkov reads skips
from `checkov.io/skipN: CHECK=reason` annotations and `# checkov:skip=CHECK: reason` comments;
hadolint ignores must sit under a comment line that says why).

Usage: check_lint.py KUBECTL VENV_BIN
"""
import json
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import deploy_common  # noqa: E402

CONTAINER = os.path.join(deploy_common.DEPLOY, "container")
DOCKERFILES = [os.path.join(CONTAINER, f) for f in ("Dockerfile", "Dockerfile.cuda")]


def checkov(venv_bin, arguments):
    # No network: no guideline download, no platform mapping.
    env = dict(os.environ, BC_SKIP_MAPPING="TRUE", CHECKOV_RUN_SCA_PACKAGE_SCAN_V2="false")
    result = subprocess.run([os.path.join(venv_bin, "checkov"), "--skip-download",
                             "--output", "json"] + arguments, env=env, capture_output=True, text=True,
                            timeout=300)
    try:
        reports = json.loads(result.stdout)
    except json.JSONDecodeError:
        raise RuntimeError(f"checkov printed no JSON (exit {result.returncode}):\n{result.stdout}\n{result.stderr}")
    return reports if isinstance(reports, list) else [reports]


def main():
    kubectl, venv_bin = sys.argv[1:3]
    failures = []
    checks = 0
    rendered = deploy_common.Rendered(kubectl)
    out = tempfile.mkdtemp(prefix="moeserve-rendered-")
    try:
        for name in deploy_common.KUSTOMIZATIONS:
            with open(os.path.join(out, name.replace("/", "-") + ".yaml"), "w") as f:
                f.write(rendered.render_text(name))
        reports = checkov(venv_bin, ["--framework", "kubernetes", "-d", out])
        reports += checkov(venv_bin, ["--framework", "dockerfile"] + sum((["-f", d] for d in DOCKERFILES), []))
    finally:
        rendered.close()
    for report in reports:
        results = report.get("results", {})
        summary = report.get("summary", {})
        print(f"checkov {report.get('check_type')}: {summary.get('passed')} passed, "
              f"{summary.get('failed')} failed, {summary.get('skipped')} skipped")
        checks += 1
        if summary.get("passed", 0) == 0:
            failures.append(f"checkov {report.get('check_type')} checked nothing")
        for failed in results.get("failed_checks", []):
            checks += 1
            failures.append(f"checkov {failed['check_id']} ({failed['check_name']}) failed on "
                            f"{failed.get('resource')} in {os.path.basename(failed.get('file_path', ''))}")
        for skipped in results.get("skipped_checks", []):
            checks += 1
            reason = (skipped.get("check_result", {}).get("suppress_comment") or "").strip()
            if len(reason) < 20 or reason.lower().startswith("no comment"):
                failures.append(f"checkov {skipped['check_id']} skipped on {skipped.get('resource')} "
                                f"without a reason ({reason!r})")

    hadolint = os.path.join(venv_bin, "hadolint")
    result = subprocess.run([hadolint] + DOCKERFILES, capture_output=True, text=True, timeout=120)
    checks += 1
    print(f"hadolint: exit {result.returncode}")
    if result.returncode != 0:
        failures.append(f"hadolint:\n{result.stdout}{result.stderr}")
    for dockerfile in DOCKERFILES:
        with open(dockerfile) as f:
            lines = f.read().split("\n")
        for number, line in enumerate(lines):
            if re.match(r"\s*#\s*hadolint\s+ignore=", line):
                checks += 1
                previous = lines[number - 1].strip() if number > 0 else ""
                if not previous.startswith("#") or "hadolint" in previous:
                    failures.append(f"{os.path.basename(dockerfile)}:{number + 1}: hadolint ignore without a "
                                    f"comment line above saying why")
    deploy_common.fail_summary(failures, checks)


if __name__ == "__main__":
    main()
