#!/usr/bin/env python3
"""Derive the Kubernetes 1.32/1.33 (resource.k8s.io/v1beta1) examples from the v1 ones.

v1beta1 has the request fields flat on the request where v1 nests them under `exactly`; the
rest is identical. The transformation is textual so that comments survive.

    hack/examples-v1beta1.py          # rewrite deploy/examples/v1beta1/
    hack/examples-v1beta1.py --check  # fail if they are out of date (CI)
"""
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
SRC = ROOT / "deploy" / "examples" / "v1"
DST = ROOT / "deploy" / "examples" / "v1beta1"
HEADER = "# Generated from ../v1/{name} by hack/examples-v1beta1.py: edit that file instead.\n"


def convert(text: str) -> str:
    out, dedent_from = [], None
    for line in text.splitlines(keepends=True):
        indent = len(line) - len(line.lstrip(" "))
        if dedent_from is not None:
            if line.strip() and indent <= dedent_from:
                dedent_from = None
            elif line.strip():
                line = line[2:]
        m = re.match(r"^(\s*)exactly:\s*$", line)
        if m and dedent_from is None:
            dedent_from = len(m.group(1))
            continue
        out.append(line.replace("apiVersion: resource.k8s.io/v1\n", "apiVersion: resource.k8s.io/v1beta1\n"))
    return "".join(out)


def main() -> int:
    check = "--check" in sys.argv[1:]
    DST.mkdir(parents=True, exist_ok=True)
    stale = []
    for src in sorted(SRC.glob("*.yaml")):
        want = HEADER.format(name=src.name) + convert(src.read_text())
        dst = DST / src.name
        if check:
            if not dst.exists() or dst.read_text() != want:
                stale.append(dst)
        else:
            dst.write_text(want)
    extra = {p.name for p in DST.glob("*.yaml")} - {p.name for p in SRC.glob("*.yaml")}
    if check and (stale or extra):
        for p in stale:
            print(f"{p.relative_to(ROOT)} is out of date: run hack/examples-v1beta1.py", file=sys.stderr)
        for name in sorted(extra):
            print(f"deploy/examples/v1beta1/{name} has no v1 source", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
