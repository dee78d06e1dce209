"""A document as blocks (headings, paragraphs, tables, images, code), rendered to Markdown or HTML."""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass, field
from urllib.parse import quote


@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Para:
    text: str
    link: tuple[str, str] | None = None  # (text, relative href) appended to the paragraph


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]
    highlight: set[int] = field(default_factory=set)


@dataclass
class Image:
    alt: str
    path: str  # relative to the run directory
    data: bytes


@dataclass
class Code:
    text: str
    lang: str = ""


@dataclass
class Bullets:
    items: list[str]


def link_target(target) -> str:
    return quote(str(target).rstrip("/") + "/")


def _md_text(text: str) -> str:
    """Plain text inside Markdown: characters that would start markup are escaped; newlines become spaces."""
    text = re.sub(r"([\\`*<>|])", r"\\\1", " ".join(str(text).split()))
    return re.sub(r"\[(?=[^\]]*\][(\[])", r"\\[", text)  # a bracket only where it would open a link


def _fence(text: str) -> str:
    ticks = "`" * max(3, 1 + max((len(m) for m in re.findall(r"`+", text)), default=0))
    return ticks


def _md_table(table: Table) -> list[str]:
    out = ["| " + " | ".join(_md_text(h) for h in table.header) + " |", "|" + "|".join("---" for _ in table.header) + "|"]
    for i, row in enumerate(table.rows):
        cells = [_md_text(c) for c in row]
        if i in table.highlight:  # bold the chosen row; the ** is markup, so it is added after escaping
            cells = [f"**{c}**" if c else c for c in cells]
        out.append("| " + " | ".join(cells) + " |")
    return out


def to_markdown(blocks: list) -> str:
    out: list[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            out.append("#" * b.level + " " + _md_text(b.text))
        elif isinstance(b, Para):
            link = f" [{_md_text(b.link[0])}]({b.link[1]})." if b.link else ""
            out.append(_md_text(b.text) + link)
        elif isinstance(b, Table):
            out.append("\n".join(_md_table(b)))
        elif isinstance(b, Image):
            out.append(f"![{_md_text(b.alt)}]({b.path})")
        elif isinstance(b, Code):
            fence = _fence(b.text)
            out.append(f"{fence}{b.lang}\n{b.text}\n{fence}")
        elif isinstance(b, Bullets):
            out.append("\n".join(f"- {_md_text(item)}" for item in b.items))
    return "\n\n".join(out) + "\n"


CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1200px;
       padding: 0 1em; color: #222; line-height: 1.45; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; display: block; overflow-x: auto; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; white-space: nowrap; }
th { background: #f3f3f3; }
tr.chosen td { background: #fff3b0; font-weight: 600; }
pre { background: #f6f8fa; padding: 0.8em; overflow-x: auto; }
figure { margin: 1em 0; }
img { max-width: 100%; height: auto; }
""".strip()


def _html_table(table: Table) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in table.header)
    body = "\n".join(
        ("<tr class=\"chosen\">" if i in table.highlight else "<tr>")
        + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for i, row in enumerate(table.rows))
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table>"


def to_html(blocks: list) -> str:
    title = next((b.text for b in blocks if isinstance(b, Heading)), "safemerge report")
    out: list[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            out.append(f"<h{b.level}>{html.escape(b.text)}</h{b.level}>")
        elif isinstance(b, Para):
            link = f" <a href=\"{html.escape(b.link[1])}\">{html.escape(b.link[0])}</a>." if b.link else ""
            out.append(f"<p>{html.escape(b.text)}{link}</p>")
        elif isinstance(b, Table):
            out.append(_html_table(b))
        elif isinstance(b, Image):
            data = base64.b64encode(b.data).decode("ascii")
            out.append(f"<figure><img alt=\"{html.escape(b.alt)}\" src=\"data:image/png;base64,{data}\">"
                       f"<figcaption>{html.escape(b.alt)}</figcaption></figure>")
        elif isinstance(b, Code):
            out.append(f"<pre><code>{html.escape(b.text)}</code></pre>")
        elif isinstance(b, Bullets):
            out.append("<ul>\n" + "\n".join(f"<li>{html.escape(i)}</li>" for i in b.items) + "\n</ul>")
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{html.escape(title)}</title>\n<style>\n{CSS}\n</style>\n</head>\n<body>\n"
            + "\n".join(out) + "\n</body>\n</html>\n")
