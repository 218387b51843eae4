"""Installed size of each optional extra of unigendet, measured in the current environment.

    python scripts/extra-sizes.py            # a Markdown table
    python scripts/extra-sizes.py --json

For every extra: the distributions it pulls in beyond the base requirements (torch, numpy, ...) and what they
take on disk (the sizes in their RECORD files). The extras must be installed (``pip install -e ".[all,dali]"``);
a missing distribution is reported.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import re

from packaging.requirements import Requirement


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _dists() -> dict[str, md.Distribution]:
    return {_norm(d.metadata["Name"]): d for d in md.distributions()}


def _size(d: md.Distribution) -> int:
    total = 0
    for f in d.files or []:
        if f.size:
            total += f.size
        else:
            try:
                total += os.path.getsize(f.locate())
            except OSError:
                pass
    return total


def _closure(names, dists, missing: set[str]) -> set[str]:
    seen: set[str] = set()
    stack = [_norm(n) for n in names]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        if n not in dists:
            missing.add(n)
            continue
        seen.add(n)
        for r in dists[n].requires or []:
            req = Requirement(r)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                stack.append(_norm(req.name))
    return seen


def measure() -> dict:
    dists = _dists()
    me = dists["unigendet"]
    base, extras = [], {}
    for r in me.requires or []:
        req = Requirement(r)
        extra = None
        if req.marker is not None:
            m = re.search(r'extra\s*==\s*"([^"]+)"', str(req.marker))
            extra = m.group(1) if m else None
        (extras.setdefault(extra, []) if extra else base).append(req.name)
    missing: set[str] = set()
    base_set = _closure(base, dists, missing)
    out = {"base": {"packages": sorted(base_set), "bytes": sum(_size(dists[n]) for n in base_set)}}
    torch_set = _closure(["torch"], dists, missing)
    out["torch"] = {"packages": sorted(torch_set), "bytes": sum(_size(dists[n]) for n in torch_set)}
    for name, reqs in sorted(extras.items()):
        miss: set[str] = set()
        pulled = _closure(reqs, dists, miss) - base_set
        out[name] = {"packages": sorted(pulled), "bytes": sum(_size(dists[n]) for n in pulled),
                     "missing": sorted(miss)}
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    res = measure()
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    print("| extra | installed size (MB) | largest distributions | not installed |")
    print("| --- | ---: | --- | --- |")
    dists = _dists()
    for name, r in res.items():
        top = sorted(r["packages"], key=lambda n: -_size(dists[n]))[:4]
        big = ", ".join(f"{n} {_size(dists[n]) / 1e6:.0f}" for n in top)
        print(f"| {name} | {r['bytes'] / 1e6:.0f} | {big} | {', '.join(r.get('missing', [])) or '-'} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
