"""The documentation under docs/ stays true to the code: the configuration reference is the
one ``python -m jobs.config_reference`` writes, links and named functions exist, quoted error
messages are the code's, and no file of the project points at the private design notes."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from jobs import config_reference as ref
from wsdan.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
DOC_FILES = sorted(DOCS.glob("*.md"))
CODE_DIRS = ("wsdan", "jobs", "tuning")


# -- the configuration reference -----------------------------------------------------------


def test_config_reference_is_current():
    assert ref.is_current(ref.DEFAULT_FILE), (
        "docs/operations.md's configuration reference is stale: run "
        "`python -m jobs.config_reference`")


def test_config_reference_has_every_key_with_a_meaning():
    rows = ref.reference_rows()  # raises ReferenceError naming a field without a comment
    assert [key for _, key, *_ in rows] == list(TrainConfig().flat())
    assert all(meaning for *_, meaning in rows)


def test_check_mode_fails_on_a_stale_file_and_write_fixes_it(tmp_path, capsys):
    doc = tmp_path / "ops.md"
    text = ref.DEFAULT_FILE.read_text(encoding="utf-8")
    doc.write_text(text.replace("| `seed` |", "| `seed_stale` |"), encoding="utf-8")
    check = ref.get_args_parser().parse_args(["--check", "--file", str(doc)])
    assert ref.main(check) == 1
    assert "stale" in capsys.readouterr().err
    assert ref.main(ref.get_args_parser().parse_args(["--file", str(doc)])) == 0
    assert ref.main(check) == 0
    assert doc.read_text(encoding="utf-8") == text  # only the block between the markers
    doc.write_text("no markers here\n", encoding="utf-8")
    assert ref.main(check) == 1
    assert "markers" in capsys.readouterr().err


# -- no pointers to the private design notes -------------------------------------------------

# Written so that this file does not match itself.
PARENT_SHARED = re.compile(r"\.\.[/\\]shared\b")
ALLOWED_IN_TESTS = re.compile(r"\.\.[/\\]shared[/\\]vendor\b")
DESIGN = re.compile(r"shared[\"']?\s*[/\\,]\s*[\"']?design", re.IGNORECASE)
ABSOLUTE = re.compile(r"/work/+shared\b")
# The private notes by bare file name (system, environment, style): the project has none.
NOTES = re.compile(r"(?<![\w/.-])(?:system|environment|sty" r"le)\.md\b")


def _tracked_files() -> list[str]:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: no tracked-file list to scan")
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True)
    return [p for p in out.stdout.decode().split("\0") if p]


def _problems(rel: str, text: str) -> list[str]:
    found = []
    for n, line in enumerate(text.splitlines(), 1):
        hits = [m.group(0) for m in DESIGN.finditer(line)]
        hits += [m.group(0) for m in ABSOLUTE.finditer(line)]
        hits += [m.group(0) for m in NOTES.finditer(line)]
        for m in PARENT_SHARED.finditer(line):
            if not (rel.startswith("tests/") and ALLOWED_IN_TESTS.match(line, m.start())):
                hits.append(m.group(0))
        found += [f"{rel}:{n}: {h!r} in: {line.strip()[:120]}" for h in hits]
    return found


def test_the_scan_catches_what_it_should():
    up, design = "../" + "shared", "shared" + "/design"
    assert _problems("wsdan/x.py", f"see {up}/{design[7:]}/algorithm.md")
    assert _problems("README.md", f"notes in {design}/")
    assert _problems("wsdan/x.py", 'Path("/work") / "shared" / "' + 'design"')
    assert _problems("wsdan/x.py", f"{up}/vendor/crds")  # vendor: tests only
    assert not _problems("tests/infra/x.py", f"{up}/vendor/crds")
    assert _problems("tests/infra/x.py", f"{up}/notes")
    assert _problems("wsdan/x.py", "(" + "environment" + ".md, 'Addresses')")
    assert not _problems("wsdan/x.py", "see docs/algorithm.md §3")


def test_no_file_refers_to_the_private_design_notes():
    problems = []
    for rel in _tracked_files():
        path = ROOT / rel
        if not path.is_file():
            continue  # deleted in the work tree
        data = path.read_bytes()
        if b"\0" in data:
            continue  # binary
        problems += _problems(rel, data.decode("utf-8", errors="replace"))
    assert not problems, "\n".join(problems)


# -- links and names in the docs -------------------------------------------------------------

LINK = re.compile(r"\[([^\]]*)\]\(([^)\s]+)\)")
CODE_NAME = re.compile(r"`([A-Za-z_][\w.]*)`")


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(md: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", md.read_text(encoding="utf-8"), flags=re.DOTALL)
    return {_slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.*)$", text, re.MULTILINE)}


def _defined_names(py: Path) -> set[str]:
    """Functions, classes, methods, constants, fields and registered buffers of ``py``."""
    names = set()
    for node in ast.walk(ast.parse(py.read_text(encoding="utf-8"))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "register_buffer"
              and node.args and isinstance(node.args[0], ast.Constant)):
            names.add(str(node.args[0].value))
    return names


def _defines(py: Path, name: str) -> bool:
    """Whether ``py`` defines ``name`` (``Class.member``: the member's name is looked up)."""
    return name.rsplit(".", 1)[-1] in _defined_names(py)


@pytest.mark.parametrize("doc", DOC_FILES, ids=[d.name for d in DOC_FILES])
def test_doc_links_and_named_code_exist(doc):
    problems = []
    for n, line in enumerate(doc.read_text(encoding="utf-8").splitlines(), 1):
        for label, target in LINK.findall(line):
            if re.match(r"^[a-z]+:", target):
                continue  # http(s), mailto
            path, _, anchor = target.partition("#")
            dest = (doc.parent / path).resolve() if path else doc
            if not dest.exists():
                problems.append(f"{doc.name}:{n}: {target} does not exist")
                continue
            if anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                problems.append(f"{doc.name}:{n}: no heading #{anchor} in {dest.name}")
            named = CODE_NAME.fullmatch(label)
            if dest.suffix == ".py" and named and not _defines(dest, named.group(1)):
                problems.append(f"{doc.name}:{n}: {named.group(1)} is not defined in {path}")
    assert not problems, "\n".join(problems)


def test_benchmark_sections_cited_by_the_docs_exist():
    headings = [line for line in (ROOT / "BENCHMARKS.md").read_text(encoding="utf-8").splitlines()
                if line.startswith("#")]
    cited = {" ".join(m.group(1).split()) for doc in DOC_FILES
             for m in re.finditer(r'BENCHMARKS\s+"([^"]+)"', doc.read_text(encoding="utf-8"))}
    assert cited
    missing = [c for c in cited if not any(c in h for h in headings)]
    assert not missing, f"BENCHMARKS.md has no section named {missing}"


def test_algorithm_section_references_exist():
    """Code comments cite ``docs/algorithm.md §N`` or ``§N.M``: each must be a heading."""
    text = (DOCS / "algorithm.md").read_text(encoding="utf-8")
    sections = set(re.findall(r"^#{2,3} (\d+(?:\.\d+)?)\.? ", text, re.MULTILINE))
    problems = []
    for top in CODE_DIRS + ("tests",):
        for path in sorted((ROOT / top).rglob("*")):
            if path.suffix not in (".py", ".yaml", ".yml", ".md") or not path.is_file():
                continue
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                for m in re.finditer(r"algorithm\.md §(\d+(?:\.\d+)?)(?:-(\d+))?", line):
                    for sec in filter(None, m.groups()):
                        if sec not in sections:
                            problems.append(f"{path.relative_to(ROOT)}:{n}: §{sec}")
    assert not problems, "no such section in docs/algorithm.md:\n" + "\n".join(problems)


def _string_pieces() -> list[str]:
    """Every string constant of the code, f-strings split at their placeholders."""
    pieces = []
    for top in CODE_DIRS:
        for path in (ROOT / top).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Constant) and isinstance(node.value, str):
                    pieces.append(node.value)
    return pieces


def test_troubleshooting_messages_are_the_codes():
    """Each message quoted in the Troubleshooting tables (first column; ``…`` stands for a
    value the code fills in) is made of pieces of the code's own strings."""
    text = (DOCS / "operations.md").read_text(encoding="utf-8")
    section = text.split("## Troubleshooting", 1)[1]
    strings = _string_pieces()
    quoted, missing = [], []
    for line in section.splitlines():
        if not line.startswith("| `") and not line.startswith("| …"):
            continue
        first = line.split(" | ", 1)[0]
        for span in re.findall(r"`([^`]+)`", first):
            quoted.append(span)
            for piece in (p.strip() for p in span.split("…")):
                if piece and not any(piece in s for s in strings):
                    missing.append(f"{span!r}: {piece!r}")
    assert len(quoted) >= 30
    assert not missing, "not in the code:\n" + "\n".join(missing)


def test_readme_links_the_docs():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for doc in ("docs/algorithm.md", "docs/architecture.md", "docs/operations.md"):
        assert f"]({doc})" in readme, doc
