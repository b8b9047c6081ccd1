"""Write the configuration reference of docs/operations.md from the config dataclasses.

    python -m jobs.config_reference            # rewrite the table in docs/operations.md
    python -m jobs.config_reference --check    # exit 1 if the file is stale

Every key of :class:`wsdan.config.TrainConfig` (its sections ``model``, ``augment``, ``optim``,
``data``, ``inference`` and its top-level fields) becomes one row: dotted key, type, default
and meaning. Defaults are read from the dataclasses themselves; types and meanings from the
source of ``wsdan/config.py``: the meaning is the trailing ``# comment`` of the field's line,
and a field without one is an error (add the comment there, not here). The tables go
between the two marker comments of the target file; everything outside them is left alone.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import io
import sys
import tokenize
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_FILE = ROOT / "docs" / "operations.md"
BEGIN = ("<!-- config-reference:begin (written by `python -m jobs.config_reference`; "
         "edit the comments in wsdan/config.py, not this table) -->")
END = "<!-- config-reference:end -->"


class ReferenceError(Exception):
    """The source or the target file cannot give a complete reference."""


def _field_docs(source: str) -> dict[str, dict[str, tuple[str, str]]]:
    """``{class name: {field: (annotation, trailing comment)}}`` of the dataclasses in
    ``source``; the comment is "" when the field's line has none."""
    comments: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    out: dict[str, dict[str, tuple[str, str]]] = {}
    for node in ast.parse(source).body:
        if not isinstance(node, ast.ClassDef):
            continue
        fields = {}
        for stmt in node.body:
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                line = stmt.end_lineno or stmt.lineno
                fields[stmt.target.id] = (ast.unparse(stmt.annotation), comments.get(line, ""))
        out[node.name] = fields
    return out


def _value(v: Any) -> str:
    """A default as it is written in the YAML configs."""
    if v is None:
        return "`null`"
    if isinstance(v, bool):
        return f"`{str(v).lower()}`"
    if isinstance(v, str):
        return f'`"{v}"`' if v == "" else f"`{v}`"
    return f"`{v!r}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def reference_rows() -> list[tuple[str, str, str, str, str]]:
    """``(section, dotted key, type, default, meaning)`` for every config key, in the order
    of the dataclasses. Raises :class:`ReferenceError` naming any field without a comment."""
    import wsdan.config as config

    docs = _field_docs(Path(config.__file__).read_text(encoding="utf-8"))
    default = config.TrainConfig()
    rows, missing = [], []

    def add(section: str, cls: type, obj: Any, prefix: str) -> None:
        for f in dataclasses.fields(cls):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                continue
            ann, meaning = docs[cls.__name__][f.name]
            if not meaning:
                missing.append(f"{cls.__name__}.{f.name}")
            rows.append((section, f"{prefix}{f.name}", ann, _value(value), meaning))

    for f in dataclasses.fields(config.TrainConfig):
        value = getattr(default, f.name)
        if dataclasses.is_dataclass(value):
            add(f.name, type(value), value, f"{f.name}.")
    add("", config.TrainConfig, default, "")
    if missing:
        raise ReferenceError(
            "config fields without a trailing '# meaning' comment in wsdan/config.py: "
            + ", ".join(missing))
    return rows


def render() -> str:
    """The generated block, markers included."""
    import wsdan.config as config

    classes = {f.name: type(getattr(config.TrainConfig(), f.name)).__name__
               for f in dataclasses.fields(config.TrainConfig)
               if dataclasses.is_dataclass(getattr(config.TrainConfig(), f.name))}
    lines = [BEGIN, ""]
    current = None
    for section, key, ann, value, meaning in reference_rows():
        if section != current:
            current = section
            title = (f"`{section}.*` ({classes[section]})" if section
                     else "top level (TrainConfig)")
            lines += ([""] if len(lines) > 2 else []) + [
                f"#### {title}", "",
                "| key | type | default | meaning |", "|---|---|---|---|"]
        lines.append(f"| `{key}` | `{_cell(ann)}` | {_cell(value)} | {_cell(meaning)} |")
    lines += ["", END]
    return "\n".join(lines)


def _split(text: str, path: Path) -> tuple[str, str, str]:
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise ReferenceError(f"{path}: needs exactly one pair of markers, in this order:\n"
                             f"  {BEGIN}\n  {END}")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return head, text[len(head):len(text) - len(tail)], tail


def is_current(path: Path = DEFAULT_FILE) -> bool:
    """Whether ``path`` holds exactly the reference :func:`render` makes now."""
    _, block, _ = _split(path.read_text(encoding="utf-8"), path)
    return block == render()


def write(path: Path = DEFAULT_FILE) -> bool:
    """Rewrite the block in ``path``; True if the file changed."""
    text = path.read_text(encoding="utf-8")
    head, block, tail = _split(text, path)
    new = render()
    if block == new:
        return False
    path.write_text(head + new + tail, encoding="utf-8")
    return True


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--file", type=Path, default=DEFAULT_FILE,
                   help="markdown file with the two marker comments")
    p.add_argument("--check", action="store_true",
                   help="write nothing; exit 1 if the file's reference is stale")
    return p


def main(args: argparse.Namespace) -> int:
    try:
        if args.check:
            if is_current(args.file):
                print(f"{args.file}: configuration reference is current")
                return 0
            print(f"{args.file}: configuration reference is stale; run "
                  "`python -m jobs.config_reference`", file=sys.stderr)
            return 1
        changed = write(args.file)
    except ReferenceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{args.file}: " + ("configuration reference updated" if changed else "unchanged"))
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
