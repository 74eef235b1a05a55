"""Writes the demo table of the committed report into the README.

    python -m experiments.readme_tables            # rewrite README.md
    python -m experiments.readme_tables --check    # exit 1 if README.md is stale

The README's block between the lines `<!-- demo-table:begin -->` and
`<!-- demo-table:end -->` becomes `kdq.report.format_table` of the runs in
`experiments/results/demo_report.json` (written by `python -m experiments.demo
--results=experiments/results/demo_report.json`), inside a ``` fence.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from kdq.report import format_table

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
REPORT = os.path.join(ROOT, "experiments", "results", "demo_report.json")
BEGIN = "<!-- demo-table:begin -->"
END = "<!-- demo-table:end -->"


def demo_block(report_path: str = REPORT) -> str:
    """The text that goes between the markers: the table of `report_path` in a ``` fence."""
    with open(report_path) as f:
        report = json.load(f)
    return f"```\n{format_table(report['runs'])}\n```"


def split_readme(text: str, begin: str = BEGIN, end: str = END) -> tuple[str, str, str]:
    """(text up to and including the begin marker line, the block, text from the end marker).

    Args:
      text: the README.
      begin, end: the marker lines (the demo table's by default).

    Returns:
      The three parts.

    Raises:
      ValueError: the markers are missing, repeated or out of order.
    """
    lines = text.splitlines(keepends=True)
    begins = [i for i, line in enumerate(lines) if line.strip() == begin]
    ends = [i for i, line in enumerate(lines) if line.strip() == end]
    if len(begins) != 1 or len(ends) != 1 or begins[0] > ends[0]:
        raise ValueError(
            f"the README must hold exactly one line {begin!r} followed by one line {end!r} "
            f"(found {len(begins)} and {len(ends)}); add them where the demo table goes"
        )
    b, e = begins[0], ends[0]
    return "".join(lines[: b + 1]), "".join(lines[b + 1 : e]).strip("\n"), "".join(lines[e:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readme", default=README)
    parser.add_argument("--report", default=REPORT)
    parser.add_argument("--check", action="store_true", help="only check; exit 1 if stale")
    args = parser.parse_args(argv)
    with open(args.readme) as f:
        text = f.read()
    head, block, tail = split_readme(text)
    wanted = demo_block(args.report)
    if args.check:
        if block != wanted:
            print(f"{args.readme}: the demo table differs from {args.report}", file=sys.stderr)
            return 1
        return 0
    with open(args.readme, "w") as f:
        f.write(f"{head}{wanted}\n{tail}")
    print(f"wrote the table of {args.report} into {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
