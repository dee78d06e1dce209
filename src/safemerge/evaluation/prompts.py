"""Safety prompt sets (AdvBench, HEx-PHI, XSTest, user files): loading, a content hash, and a
deterministic selection/report split.

Specs, as given to `safemerge evaluate --safety`:

    advbench[:PATH]      harmful_behaviors.csv (column `goal`); without PATH the Hub copy walledai/AdvBench
    hexphi:PATH          a folder of category_N.csv files (one prompt per row, header optional) or a
                         JSON/JSONL file with prompt/instruction/text and category fields
    xstest[:PATH]        xstest_prompts.csv (id, prompt, type, label); without PATH the Hub copy walledai/XSTest
    file:PATH[:COLUMN]   a CSV with a header row, or JSONL / a JSON list of objects

PATH may itself contain ':'. In `file:PATH:COLUMN` (and `bbh:PATH:TASK`, `file:PATH:SCORER` in
tasks.py) the option is split off at the last ':' only when the whole remainder is not an
existing path and either the part before it exists or the part after it is a plain identifier
(ASCII letters, digits and '_', not starting with a digit); otherwise the whole remainder is the path.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from safemerge.errors import ConfigError, hub_errors

KNOWN_SETS = "advbench[:PATH], hexphi:PATH, xstest[:PATH], file:PATH[:COLUMN]"
TEXT_COLUMNS = ("prompt", "goal", "instruction", "question", "text")  # file: default column, first present
HEXPHI_TEXT_FIELDS = ("prompt", "instruction", "text")
XSTEST_LABELS = ("safe", "unsafe")
ADVBENCH_HUB = "walledai/AdvBench"  # column `prompt`, split train: the 520 `goal` strings
XSTEST_HUB = "walledai/XSTest"  # columns prompt, type, label (safe/unsafe), focus, note; split test
HEXPHI_HUB = "LLM-Tuning-Safety/HEx-PHI"
_IDENTIFIER = re.compile(r"[A-Za-z_]\w*")
_CATEGORY_FILE = re.compile(r"category_(\d+)\.csv")


@dataclass(frozen=True)
class Prompt:
    id: str
    text: str
    category: str | None = None
    label: str | None = None  # XSTest: "safe" (should be answered) or "unsafe" (should be refused)


def is_xstest(set_name: str) -> bool:
    """XSTest sets measure over-refusal, not ASR: they are scored by their own rule and left out of the constraint."""
    return set_name.split("/")[0].split(":")[0] == "xstest"


@dataclass(frozen=True)
class PromptSet:
    name: str  # "advbench", "hexphi", "xstest", "file:foo.csv"; split parts add "/selection", "/report"
    source: str  # the path or Hub id it was read from
    prompts: tuple[Prompt, ...]

    def __post_init__(self):
        seen: set[str] = set()
        for p in self.prompts:
            if p.id in seen:
                raise ConfigError(f"{self.source}: prompt id {p.id!r} appears twice; ids must be unique")
            seen.add(p.id)

    def __len__(self) -> int:
        return len(self.prompts)

    @cached_property
    def sha256(self) -> str:
        """A fingerprint of the contents in order; JSON keeps None apart from "None" and separators apart from text."""
        rows = [[p.id, p.text, p.category, p.label] for p in self.prompts]
        encoded = json.dumps(rows, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(encoded.encode()).hexdigest()

    def limit(self, n: int) -> PromptSet:
        """The first n prompts (all of them when there are fewer)."""
        if n < 0:
            raise ConfigError(f"a prompt limit must be >= 0, got {n}")
        return PromptSet(self.name, self.source, self.prompts[:n])

    def split(self, selection_fraction: float = 0.5, seed: int = 0) -> tuple[PromptSet, PromptSet]:
        """Disjoint (selection, report) parts: λ is chosen on one and reported on the other.

        round(fraction·N) prompts go to selection. When prompts have categories or labels, each
        (category, label) stratum contributes its proportional share (largest remainders, so the
        total is still round(fraction·N)); within a stratum the prompts with the smallest
        sha256(f"{seed}:{id}") are taken. Both parts keep the original order. Only ids and strata
        matter, so the split does not depend on the file's row order or on Python's hash seed.
        """
        if not 0 <= selection_fraction <= 1:
            raise ConfigError(f"the selection fraction must be between 0 and 1, got {selection_fraction}")
        strata: dict[tuple, list[Prompt]] = defaultdict(list)
        for p in self.prompts:
            strata[(p.category, p.label)].append(p)
        quotas = _stratum_quotas(strata, selection_fraction, seed)
        chosen: set[str] = set()
        for key, members in strata.items():
            ranked = sorted(members, key=lambda p: _seeded_hash(seed, p.id))
            chosen.update(p.id for p in ranked[: quotas[key]])
        selection = tuple(p for p in self.prompts if p.id in chosen)
        report = tuple(p for p in self.prompts if p.id not in chosen)
        return (PromptSet(f"{self.name}/selection", self.source, selection),
                PromptSet(f"{self.name}/report", self.source, report))


def _seeded_hash(seed: int, text: str) -> str:
    return hashlib.sha256(f"{seed}:{text}".encode()).hexdigest()


def _stratum_quotas(strata: dict[tuple, list], fraction: float, seed: int) -> dict[tuple, int]:
    """Largest-remainder apportionment of round(fraction·N) over the strata; ties broken by a seeded hash."""
    total = round(fraction * sum(len(m) for m in strata.values()))
    exact = {key: fraction * len(m) for key, m in strata.items()}
    quotas = {key: int(share) for key, share in exact.items()}
    by_remainder = sorted(strata, key=lambda k: (-(exact[k] - quotas[k]), _seeded_hash(seed, json.dumps(k))))
    for key in by_remainder[: max(0, total - sum(quotas.values()))]:
        quotas[key] = min(quotas[key] + 1, len(strata[key]))
    return quotas


# --- spec parsing -------------------------------------------------------------------------------


def split_path_option(rest: str) -> tuple[str, str | None]:
    """PATH[:OPTION] -> (path, option); the rule is in the module docstring."""
    if ":" not in rest or Path(rest).exists():
        return rest, None
    path, option = rest.rsplit(":", 1)
    if Path(path).exists() or _IDENTIFIER.fullmatch(option):
        return path, option
    return rest, None


# --- reading files and the Hub ------------------------------------------------------------------


def existing_file(path: str | Path, what: str = "file") -> Path:
    p = Path(path)
    if not p.is_file():
        state = "is a directory, not a file" if p.is_dir() else "does not exist"
        raise ConfigError(f"{what} {p} {state}; give the path of an existing file")
    return p


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")  # -sig: tolerate a byte-order mark (Excel exports)
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path} is not UTF-8 text (byte {e.start}); re-save it as UTF-8") from None
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}") from None


def read_jsonl(path: Path) -> list[tuple[str, dict]]:
    """(location, object) per non-blank line; a file holding one JSON list is read as that list."""
    text = _read_text(path)
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} line {e.lineno}: invalid JSON ({e.msg})") from None
        located = [(f"item {i + 1}", item) for i, item in enumerate(items)]
    else:
        located = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                located.append((f"line {number}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path} line {number}: invalid JSON ({e.msg}); one JSON object per line") from None
    for where, item in located:
        if not isinstance(item, dict):
            raise ConfigError(f"{path} {where}: expected a JSON object, got {type(item).__name__}")
    return located


def read_csv_rows(path: Path) -> tuple[list[str], list[tuple[str, dict]]]:
    """The header and (location, row) of a CSV with a header row."""
    lines = _read_text(path).splitlines(keepends=True)
    reader = csv.DictReader(lines)
    try:
        header = list(reader.fieldnames or [])
        rows = [(f"line {reader.line_num}", row) for row in reader]
    except csv.Error as e:
        raise ConfigError(f"{path} line {reader.line_num}: bad CSV ({e})") from None
    return header, rows


def read_table(path: Path) -> tuple[list[str], list[tuple[str, dict]]]:
    """Columns (in order of first appearance) and rows of a CSV, JSONL or JSON-list file."""
    if path.suffix.lower() in (".jsonl", ".json"):
        rows = read_jsonl(path)
        columns = list(dict.fromkeys(key for _, row in rows for key in row))
        return columns, rows
    return read_csv_rows(path)


def field_text(path: Path | str, where: str, row: dict, field: str) -> str:
    """A required text field of one row, or one ConfigError line naming file, line and field."""
    value = row.get(field)
    if value is None or (isinstance(value, str) and not value.strip()):
        raise ConfigError(f"{path} {where}: missing or empty field {field!r}")
    if isinstance(value, (dict, list, bool)):
        raise ConfigError(f"{path} {where}: field {field!r} must be text, got {type(value).__name__}")
    return str(value)


def _optional_text(row: dict, field: str) -> str | None:
    value = row.get(field)
    return None if value is None or str(value).strip() == "" else str(value).strip()


def hub_rows(repo_id: str, split: str, config: str | None = None) -> list[dict]:
    """All rows of one split of a Hub dataset, via `datasets` (imported here: it is optional)."""
    try:
        import datasets
    except ImportError:
        raise ConfigError(f"reading {repo_id} from the Hub needs the datasets package: "
                          "install datasets or give a PATH") from None
    try:
        data = datasets.load_dataset(repo_id, config, split=split)
    except hub_errors() as e:  # offline, gated, renamed, no such split: one answer for all
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ConfigError(f"cannot load the Hub dataset {repo_id} (split {split}): {reason}; "
                          "download the data and give its PATH instead") from None
    return [dict(row) for row in data]


def _nonempty(prompt_set: PromptSet) -> PromptSet:
    if not prompt_set.prompts:
        raise ConfigError(f"{prompt_set.source}: no prompts found in the {prompt_set.name} set")
    return prompt_set


def _pick_column(path: Path | str, columns: list[str], wanted: tuple[str, ...]) -> str:
    for column in wanted:
        if column in columns:
            return column
    present = ", ".join(columns) or "none"
    raise ConfigError(f"{path} has no {' or '.join(map(repr, wanted))} column; its columns: {present}")


# --- the sets -----------------------------------------------------------------------------------


def load_advbench(path: str | None = None) -> PromptSet:
    """AdvBench harmful behaviors (520): the `goal` column of harmful_behaviors.csv, or the Hub copy."""
    if path is None:
        rows = [(f"row {i}", row) for i, row in enumerate(hub_rows(ADVBENCH_HUB, "train"))]
        source, column = ADVBENCH_HUB, "prompt"
        _pick_column(source, list(rows[0][1]) if rows else [], (column,))
    else:
        file = existing_file(path, "AdvBench file")
        columns, rows = read_table(file)
        source, column = str(file), _pick_column(file, columns, ("goal", "prompt"))
    prompts = tuple(Prompt(f"advbench/{i}", field_text(source, where, row, column).strip())
                    for i, (where, row) in enumerate(rows))
    return _nonempty(PromptSet("advbench", source, prompts))


def load_xstest(path: str | None = None) -> PromptSet:
    """XSTest (450: 250 safe, 200 unsafe contrasts); category = type, label kept."""
    if path is None:
        rows = [(f"row {i}", row) for i, row in enumerate(hub_rows(XSTEST_HUB, "test"))]
        source = XSTEST_HUB
        columns = list(rows[0][1]) if rows else []
    else:
        file = existing_file(path, "XSTest file")
        source = str(file)
        columns, rows = read_table(file)
    for required in ("prompt", "label"):
        _pick_column(source, columns, (required,))
    prompts = []
    for i, (where, row) in enumerate(rows):
        label = field_text(source, where, row, "label").strip().lower()
        if label not in XSTEST_LABELS:
            raise ConfigError(f"{source} {where}: label {label!r} is not 'safe' or 'unsafe'")
        row_id = _optional_text(row, "id") or str(i + 1)  # upstream ids are 1-based row numbers
        text = field_text(source, where, row, "prompt").strip()
        prompts.append(Prompt(f"xstest/{row_id}", text, _optional_text(row, "type"), label))
    return _nonempty(PromptSet("xstest", source, tuple(prompts)))


def load_hexphi(path: str | None) -> PromptSet:
    """HEx-PHI (11 categories): a folder of category_N.csv, one category_N.csv, or a JSON/JSONL file."""
    if path is None:
        raise ConfigError(f"hexphi needs a PATH: HEx-PHI is gated on the Hub ({HEXPHI_HUB}); accept its terms "
                          "there, download it and give hexphi:PATH (a folder of category_N.csv files or a JSONL file)")
    root = Path(path)
    if root.is_dir():
        files = sorted((f for f in root.iterdir() if _CATEGORY_FILE.fullmatch(f.name)),
                       key=lambda f: int(_CATEGORY_FILE.fullmatch(f.name).group(1)))
        if not files:
            raise ConfigError(f"{root} holds no category_N.csv files; give the HEx-PHI folder or a JSONL file")
        prompts = tuple(p for f in files for p in _hexphi_category_file(f))
    elif root.suffix.lower() in (".json", ".jsonl"):
        prompts = _hexphi_records(existing_file(root, "HEx-PHI file"))
    else:
        prompts = _hexphi_category_file(existing_file(root, "HEx-PHI file"))
    return _nonempty(PromptSet("hexphi", str(root), prompts))


def _hexphi_category_file(file: Path) -> tuple[Prompt, ...]:
    """One prompt per row, no header in the release; a first row naming a text column is a header."""
    try:
        rows = [row for row in csv.reader(_read_text(file).splitlines(keepends=True)) if any(c.strip() for c in row)]
    except csv.Error as e:
        raise ConfigError(f"{file}: bad CSV ({e})") from None
    column = 0
    if rows:
        names = [cell.strip().lower() for cell in rows[0]]
        named = [names.index(c) for c in TEXT_COLUMNS if c in names]
        if named:
            column, rows = named[0], rows[1:]
    category = file.stem
    return tuple(Prompt(f"hexphi/{category}/{i}", row[column].strip(), category)
                 for i, row in enumerate(rows) if len(row) > column and row[column].strip())


def _hexphi_records(file: Path) -> tuple[Prompt, ...]:
    rows = read_jsonl(file)
    columns = list(dict.fromkeys(key for _, row in rows for key in row))
    text_field = _pick_column(file, columns, HEXPHI_TEXT_FIELDS)
    return tuple(Prompt(f"hexphi/{_optional_text(row, 'id') or i}", field_text(file, where, row, text_field).strip(),
                        _optional_text(row, "category"))
                 for i, (where, row) in enumerate(rows))


def load_prompt_file(path: str, column: str | None = None) -> PromptSet:
    """A user's prompts: a CSV with a header row, JSONL or a JSON list. Optional `id`, `category` and
    `label` columns are kept (categories and labels stratify the split)."""
    file = existing_file(path, "prompt file")
    columns, rows = read_table(file)
    column = _pick_column(file, columns, (column,) if column else TEXT_COLUMNS)
    prompts = tuple(Prompt(f"{file.stem}/{_optional_text(row, 'id') or i}",
                           field_text(file, where, row, column).strip(),
                           _optional_text(row, "category"), _optional_text(row, "label"))
                    for i, (where, row) in enumerate(rows))
    return _nonempty(PromptSet(f"file:{file.name}", str(file), prompts))


# --- safety sets by name ------------------------------------------------------------------------


def _file_set(path: str | None) -> PromptSet:
    if path is None:
        raise ConfigError("file: needs a path: file:PATH[:COLUMN] (a CSV with a header row, or JSONL)")
    file, column = split_path_option(path)
    return load_prompt_file(file, column)


SAFETY_SETS: dict[str, Callable[[str | None], PromptSet]] = {
    "advbench": load_advbench, "hexphi": load_hexphi, "xstest": load_xstest, "file": _file_set}


def load_safety_set(spec: str) -> PromptSet:
    """A safety prompt set from its spec (see the module docstring)."""
    name, _, rest = spec.partition(":")
    loader = SAFETY_SETS.get(name.strip().lower())
    if loader is None:
        raise ConfigError(f"unknown safety prompt set {spec!r}; available: {KNOWN_SETS}")
    return loader(rest or None)
