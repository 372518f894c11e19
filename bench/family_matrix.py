"""Render the family x step matrix that tests/core/test_family_matrix.py wrote into README.md.

Usage: python bench/family_matrix.py [--check]. The table sits between the two marker lines; with
--check nothing is written and the exit status says whether README.md is current.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MATRIX = ROOT / "artifacts" / "family_matrix.json"
README = ROOT / "README.md"
BEGIN, END = "<!-- family-matrix:begin -->", "<!-- family-matrix:end -->"
LABELS = {"gemma3_text": "gemma3", "gpt2": "other (gpt2)"}


def render(matrix: dict[str, dict[str, str]]) -> str:
    families = list(matrix)
    steps = list(next(iter(matrix.values())))
    lines = ["| step | " + " | ".join(LABELS.get(f, f) for f in families) + " |",
             "|---|" + "---|" * len(families)]
    reasons: list[str] = []
    for step in steps:
        cells = []
        for f in families:
            outcome = matrix[f][step]
            if outcome == "works":
                cells.append("✓")
                continue
            reason = outcome.removeprefix("refused: ")
            if reason not in reasons:
                reasons.append(reason)
            cells.append(f"refused ({reasons.index(reason) + 1})")
        lines.append(f"| `{step}` | " + " | ".join(cells) + " |")
    lines.append("")
    lines += [f"({i}) {reason}" for i, reason in enumerate(reasons, 1)]
    return "\n".join(lines)


def updated_readme(matrix: dict[str, dict[str, str]], text: str) -> str:
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{render(matrix)}\n{END}{tail}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report whether README.md is current")
    args = parser.parse_args()
    if not MATRIX.is_file():
        print(f"{MATRIX}: missing; run: .venv/bin/python -m pytest tests/core/test_family_matrix.py", file=sys.stderr)
        return 2
    text = README.read_text(encoding="utf-8")
    new = updated_readme(json.loads(MATRIX.read_text(encoding="utf-8")), text)
    if args.check:
        print("README.md family matrix is current" if new == text else "README.md family matrix is stale")
        return 0 if new == text else 1
    README.write_text(new, encoding="utf-8")
    print(f"README.md: family matrix written from {MATRIX.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
