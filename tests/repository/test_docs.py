"""The documentation as tests (docs/DESIGN.md, "Layout").

* docs/DESIGN.md has exactly the sections the code cites, in order.
* No file of the package, the C++ sources, the tests, the benchmarks, the docs or the README
  mentions the planning specification the project started from: it is not in the repository, so
  a reader cannot follow such a reference. The design lives in docs/DESIGN.md.
* Every citation of the form ``docs/DESIGN.md, "<Section>"`` (in code, comments, docstrings or
  Markdown; a citation may wrap across comment lines) names a section that DESIGN.md has.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DESIGN = Path("docs") / "DESIGN.md"
# The sections of docs/DESIGN.md, in order: code cites them by these names.
SECTIONS = (
    "Layout",
    "Dead channels",
    "ABRi as one BatchNorm",
    "Fusion Tuning (FusT)",
    "Audio-visual setup",
    "Op contracts",
    "Kernel designs and launch plans",
    "Performance model",
    "PyTorch conventions",
    "Triton without a GPU",
    "Deviations from the official code",
    "Offline data",
)
# What is checked: these folders (recursively) and top-level files, where they exist.
SCANNED = (
    "avkernels",
    "csrc",
    "tests",
    "benchmarks",
    "docs",
    ".ci",
    "README.md",
    "CONTRIBUTING.md",
    "setup.py",
    "pyproject.toml",
    "requirements-dev.txt",
    "requirements-data.txt",
    "dev",
)
SKIPPED_SUFFIXES = {".so", ".o", ".pyc", ".png", ".jpg", ".pt", ".npz", ".wav"}
# The specification's name, as a word (an uppercase token, or its file name in any case). The
# pattern is written in two pieces so that this file does not match it.
EXTERNAL_REFERENCE = re.compile(r"(?<![A-Za-z])S" r"PEC(?![A-Za-z])|(?i:\bs" r"pec\.md\b)")
# A citation: the file, a comma, then the section name in double quotes (at most 120
# characters, which may wrap across lines of a comment or docstring).
CITATION = re.compile(r'docs/DESIGN\.md,\s*"([^"]{1,120})"')
# What a wrapped citation's continuation line starts with: indentation and a comment marker.
CONTINUATION = re.compile(r"\s*\n\s*(?:#+|//+|\*)?\s*")
HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")


def scanned_files(root: Path) -> Iterator[tuple[Path, str]]:
    """``(path relative to root, text)`` of every text file under the scanned paths."""
    for entry in SCANNED:
        path = root / entry
        candidates = sorted(path.rglob("*")) if path.is_dir() else [path]
        for candidate in candidates:
            if (
                not candidate.is_file()
                or "__pycache__" in candidate.parts
                or candidate.suffix in SKIPPED_SUFFIXES
            ):
                continue
            try:
                text = candidate.read_text(encoding="utf-8")
            except UnicodeDecodeError:  # a binary file
                continue
            yield candidate.relative_to(root), text


def line_of(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def specification_mentions(root: Path) -> list[str]:
    """``path:line: text`` of every mention of the specification."""
    found = []
    for path, text in scanned_files(root):
        for match in EXTERNAL_REFERENCE.finditer(text):
            line = line_of(text, match.start())
            found.append(f"{path}:{line}: {text.splitlines()[line - 1].strip()}")
    return found


def citations(root: Path) -> list[tuple[str, str]]:
    """``(path:line, section name)`` of every citation of docs/DESIGN.md; placeholders such as
    ``"<Section>"`` are not citations."""
    found = []
    for path, text in scanned_files(root):
        for match in CITATION.finditer(text):
            name = CONTINUATION.sub(" ", match.group(1)).strip()
            if not (name.startswith("<") and name.endswith(">")):
                found.append((f"{path}:{line_of(text, match.start())}", name))
    return found


def headings(markdown: str, level: int | None = None) -> list[str]:
    """The titles of the Markdown headings (of one level, or all), outside fenced code."""
    titles, fenced = [], False
    for line in markdown.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        match = None if fenced else HEADING.match(line)
        if match and (level is None or len(match.group(1)) == level):
            titles.append(match.group(2))
    return titles


def unknown_citations(root: Path) -> list[str]:
    """``path:line: "name"`` of every citation of a section docs/DESIGN.md does not have."""
    sections = set(headings((root / DESIGN).read_text(encoding="utf-8")))
    return [f'{where}: "{name}"' for where, name in citations(root) if name not in sections]


def test_design_has_exactly_the_cited_sections():
    assert headings((ROOT / DESIGN).read_text(encoding="utf-8"), level=2) == list(SECTIONS)


def test_nothing_mentions_the_planning_specification():
    mentions = specification_mentions(ROOT)
    assert not mentions, "cite docs/DESIGN.md by section instead:\n" + "\n".join(mentions)


def test_every_design_citation_names_a_section():
    assert citations(ROOT), "nothing cites docs/DESIGN.md: is the citation pattern still right?"
    unknown = unknown_citations(ROOT)
    assert not unknown, (
        f"citations of sections that {DESIGN} does not have (its sections: {SECTIONS}):\n"
        + "\n".join(unknown)
    )


def test_the_checks_find_what_they_look_for(tmp_path):
    """Each check fails on a tree that breaks its rule (so a passing run means something)."""
    (tmp_path / "docs").mkdir()
    (tmp_path / DESIGN).write_text("# Design\n\n## Dead channels\n\n```\n## Not a heading\n```\n")
    package = tmp_path / "avkernels"
    package.mkdir()
    # The specification's name and the citations are built from pieces (joined with + and
    # f-strings, which the formatter keeps) so that this file does not match the checks it tests.
    cite = f"{DESIGN.as_posix()},"
    (package / "module.py").write_text(
        f'# Counts ({cite} "Dead\n# channels"), see S' + "PEC section 3.\n"
        f'x = 1  # {cite} "Missing section"\n'
        f'y = 2  # {cite} "Not a heading"\n'
    )
    (tmp_path / "README.md").write_text("Planned in s" + f'pec.md; cite {cite} "<Section>".\n')
    (package / "_C.so").write_bytes(b"S" + b"PEC\0")  # binary files are not read

    assert specification_mentions(tmp_path) == [
        f'{Path("avkernels") / "module.py"}:2: # channels"), see S' + "PEC section 3.",
        "README.md:1: Planned in s" + f'pec.md; cite {cite} "<Section>".',
    ]
    assert [name for _, name in citations(tmp_path)] == [
        "Dead channels",
        "Missing section",
        "Not a heading",
    ]
    assert unknown_citations(tmp_path) == [
        f'{Path("avkernels") / "module.py"}:3: "Missing section"',
        f'{Path("avkernels") / "module.py"}:4: "Not a heading"',
    ]
