"""Copy generated result tables (bench/results/<name>.md, written by the benchmark scripts from their JSON) into
README.md, docs/benchmarks.md and docs/methods/*.md between `<!-- table:<name> -->` and `<!-- /table:<name> -->` markers. Never edit
those blocks by hand; `--check` (run by the test suite) fails when a block differs from its results file.

    python bench/update_readme.py [--check]
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGETS = (ROOT / "README.md", ROOT / "docs" / "benchmarks.md", *sorted((ROOT / "docs" / "methods").glob("*.md")))


def render(path: Path) -> str:
    """`path`'s text with every block whose results file exists replaced by that file's content."""
    text = path.read_text()
    for name in dict.fromkeys(re.findall(r"<!-- table:([\w-]+) -->", text)):
        src = ROOT / "bench" / "results" / f"{name}.md"
        if not src.exists():
            continue  # a block another report writes itself (bench/quality/report.py)
        body = src.read_text().strip()
        if body.startswith("# "):  # a results file's own title: the page around the block has its heading already
            body = body.split("\n", 1)[1].strip() if "\n" in body else ""
        block = f"<!-- table:{name} -->\n{body}\n<!-- /table:{name} -->"
        text = re.sub(rf"<!-- table:{name} -->.*?<!-- /table:{name} -->", lambda _: block, text, flags=re.S)
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="write nothing; exit 1 when a block differs")
    args = ap.parse_args(argv)
    stale = []
    for path in TARGETS:
        new = render(path)
        if new == path.read_text():
            continue
        if args.check:
            stale.append(str(path.relative_to(ROOT)))
        else:
            path.write_text(new)
            print(f"updated {path.relative_to(ROOT)}")
    if stale:
        print(f"generated tables differ from bench/results/ in: {', '.join(stale)} (run python bench/update_readme.py)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
