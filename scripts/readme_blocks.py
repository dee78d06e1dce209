"""Replace a generated block of README.md: the text between `<!-- NAME:begin ... -->` and `<!-- NAME:end -->`."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def replace_block(name: str, body: str, readme: Path = README) -> None:
    text = readme.read_text()
    pattern = re.compile(rf"(<!-- {re.escape(name)}:begin[^>]*-->\n).*?(<!-- {re.escape(name)}:end -->)", re.S)
    if not pattern.search(text):
        raise SystemExit(f"{readme}: no <!-- {name}:begin --> ... <!-- {name}:end --> block to replace")
    readme.write_text(pattern.sub(lambda m: m.group(1) + body.rstrip("\n") + "\n" + m.group(2), text, count=1))
