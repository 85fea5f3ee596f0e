"""Copy benchmark results (the JSON files the scripts write) into docs/benchmarks.md.

    .venv/bin/python -m benchmarks.report [--results benchmarks/results] [--doc docs/benchmarks.md]
    .venv/bin/python -m benchmarks.report --doc docs/scheduling.md --names simulate,sim_agreement

Each result replaces the text between `<!-- result:NAME:KIND -->` and `<!-- /result:NAME:KIND -->`
(KIND: gpu, cpu-tiny or cpu), so a GPU run replaces its "owed" table and nothing else; a result
without markers in the document is appended at the end under its own heading.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from benchmarks.common import RESULTS_DIR, Result, render

DOC = Path("docs/benchmarks.md")


def markers(result: Result) -> tuple[str, str]:
    key = f"{result.name}:{result.kind}"
    return f"<!-- result:{key} -->", f"<!-- /result:{key} -->"


def update(doc: str, result: Result) -> str:
    start, end = markers(result)
    block = f"{start}\n{render(result)}\n{end}"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.DOTALL)
    if pattern.search(doc):
        return pattern.sub(lambda _: block, doc, count=1)
    return f"{doc.rstrip()}\n\n### {result.title} ({result.kind})\n\n{block}\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=RESULTS_DIR)
    parser.add_argument("--doc", type=Path, default=DOC)
    parser.add_argument("--names", help="only these results (comma-separated script names)")
    args = parser.parse_args(argv)
    names = set(args.names.split(",")) if args.names else None
    doc = args.doc.read_text()
    for path in sorted(args.results.glob("*.json")):
        result = Result(**json.loads(path.read_text()))
        if names is not None and result.name not in names:
            continue
        doc = update(doc, result)
        print(f"{args.doc}: {result.name} ({result.kind}) from {path}")
    args.doc.write_text(doc)


if __name__ == "__main__":
    main()
