"""Copy generated result tables (bench/results/<name>.md, written by the benchmark scripts from their JSON) into
README.md between `<!-- table:<name> -->` and `<!-- /table:<name> -->` markers. Never edit those blocks by hand.

    python bench/update_readme.py
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    for m in re.finditer(r"<!-- table:([\w-]+) -->", text):
        name = m.group(1)
        src = ROOT / "bench" / "results" / f"{name}.md"
        if not src.exists():
            print(f"skip {name}: {src} not found")
            continue
        block = f"<!-- table:{name} -->\n{src.read_text().strip()}\n<!-- /table:{name} -->"
        text = re.sub(rf"<!-- table:{name} -->.*?<!-- /table:{name} -->", lambda _: block, text, flags=re.S)
        print(f"updated {name}")
    readme.write_text(text)


if __name__ == "__main__":
    main()
