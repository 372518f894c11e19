"""`python -m compress.inspect PATH`: print an artifact's manifest and lineage, verify every hash.

Exit 0 when intact; 1 naming each file that is missing or changed; 2 when PATH is no artifact.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from compress.artifact import Artifact, lineage, open_artifact, verify
from core.errors import UserError, run_main


def describe(artifact: Artifact) -> str:
    m = artifact.manifest
    lines = [f"artifact  {artifact.path}", f"kind      {m['kind']}", f"created   {m.get('created', '?')}",
             f"step      {m.get('step', {}).get('name', '?')}: {m.get('step', {}).get('command', '')}",
             f"content   {m['content_hash']}",
             f"files     {len(m['files'])} ({artifact.model_size_bytes() / 1e6:.1f} MB)"]
    for key, value in m.get("model", {}).items():
        lines.append(f"model     {key}: {value}")
    for key, value in m.get("metrics", {}).get("values", {}).items():
        if not isinstance(value, dict):
            lines.append(f"metric    {key}: {value}")
    return "\n".join(lines)


def inspect_artifact(path: str) -> tuple[str, list[str]]:
    """The printable report and the list of integrity problems (empty when intact)."""
    artifact = open_artifact(path)
    out = [describe(artifact), "", "lineage:", f"  {artifact.kind:<12} {artifact.path}"]
    for parent, link in lineage(artifact):
        if parent is None:
            try:  # the recorded path may hold another artifact now
                other = open_artifact(link["path"])
                state = "a different artifact now: content hash changed since the child was made"
                out.append(f"  {link['kind']:<12} {link['path']}  ({state}; {other.content_hash[:12]} is not "
                           f"{link['content_hash'][:12]})")
            except UserError:
                out.append(f"  {link['kind']:<12} {link['path']}  (not found on this machine, by path or content hash)")
            continue
        if parent.content_hash != link["content_hash"]:
            state = "a different artifact now: content hash changed since the child was made"
        else:
            damage = verify(parent)
            state = "hash ok" if not damage else f"damaged: {damage[0]}"
        out.append(f"  {parent.kind:<12} {parent.path}  ({state})")
    problems = verify(artifact)
    out += ["", "integrity: " + ("ok, every file matches its sha256" if not problems else "FAILED")]
    out += [f"  {p}" for p in problems]
    return "\n".join(out), problems


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m compress.inspect", description=__doc__)
    parser.add_argument("path", help="artifact directory")
    parser.add_argument("--json", action="store_true", help="print the raw manifest instead")
    args = parser.parse_args(argv)
    report, problems = inspect_artifact(args.path)
    if args.json:
        print(json.dumps(open_artifact(args.path).manifest, indent=2))
    else:
        print(report)
    if problems:
        print(f"error: {problems[0]}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    run_main(main)
