#!/usr/bin/env python3
"""Cuts a fuzz test's replay file down to the few lines that still make it fail.

A failing run of the settings or the writes fuzz test (docs/testing.md) writes its steps to a replay file and
names it in its message (`SETTINGS_FUZZ_REPLAY=...` or `WRITES_FUZZ_REPLAY=...`); its last line is where the
router's answer first differed from PostgreSQL's. This keeps that last line and takes away every other line it
can (delta debugging) while the replay still differs there, then writes what is left next to the file
(`<file>.min`, or --out) and prints it. Each try replays the lines on fresh servers: a few seconds each, tens
of tries.

    python3 scripts/fuzz-minimize.py settings /tmp/settings-fuzz-35.steps
    python3 scripts/fuzz-minimize.py writes /tmp/writes-fuzz-7.units --out /tmp/w7.min
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

TESTS = {
    "settings": ("router_transparency", "random_settings_follow_their_client_as_on_one_postgresql", "SETTINGS_FUZZ_REPLAY"),
    "writes": ("router_2pc", "random_writes_and_transactions_give_one_postgresql_answer", "WRITES_FUZZ_REPLAY"),
}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_binary(test):
    """Builds the integration test once and returns its executable."""
    out = subprocess.run(
        ["cargo", "test", "-p", "integration", "--test", test, "--no-run", "--message-format=json"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout
    for line in out.splitlines():
        msg = json.loads(line)
        if msg.get("reason") == "compiler-artifact" and msg.get("executable") and msg["target"]["name"] == test:
            return msg["executable"]
    sys.exit(f"no executable for test {test}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("fuzz", choices=sorted(TESTS), help="which fuzz test wrote the file")
    ap.add_argument("file", help="the replay file the failing run named")
    ap.add_argument("--out", help="where to write the cut-down file (default: <file>.min)")
    args = ap.parse_args()
    test, name, var = TESTS[args.fuzz]
    lines = [l for l in open(args.file).read().split("\n") if l.strip()]
    if not lines:
        sys.exit(f"{args.file}: no lines")
    exe = test_binary(test)
    tries = 0
    scratch = tempfile.NamedTemporaryFile("w", suffix=".replay", delete=False).name

    def fails(body):
        """Whether the body and the last line still differ at the last line."""
        nonlocal tries
        tries += 1
        candidate = body + [lines[-1]]
        with open(scratch, "w") as f:
            f.write("\n".join(candidate) + "\n")
        run = subprocess.run(
            [exe, name, "--exact", "--nocapture"], cwd=os.path.join(ROOT, "tests"),
            env=dict(os.environ, **{var: scratch}), capture_output=True, text=True, timeout=600,
        )
        return f"fuzz: first difference at line {len(candidate)}" in run.stdout

    body = lines[:-1]
    if not fails(body):
        sys.exit(f"{args.file}: the replay does not differ at its last line (fixed already?)")
    n = 2
    while len(body) >= 1:
        chunk = max(1, len(body) // n)
        for i in range(0, len(body), chunk):
            candidate = body[:i] + body[i + chunk:]
            if fails(candidate):
                body, n = candidate, max(n - 1, 2)
                break
        else:
            if chunk == 1:
                break
            n = min(len(body), n * 2)
        print(f"{len(body) + 1} lines left after {tries} tries", file=sys.stderr, flush=True)
    out = args.out or args.file + ".min"
    with open(out, "w") as f:
        f.write("\n".join(body + [lines[-1]]) + "\n")
    os.unlink(scratch)
    print(f"{out}: {len(body) + 1} lines (from {len(lines)}), {tries} tries; replay it with {var}={out}", file=sys.stderr)
    print("\n".join(body + [lines[-1]]))


if __name__ == "__main__":
    main()
