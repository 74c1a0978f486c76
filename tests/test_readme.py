"""The README's Layout (the code block under "## Layout") names every file of the repository's code
folders, and only files that exist.

The block is a tree: a folder is a name ending in "/", its entries are indented two spaces deeper,
and a line indented to the description column continues the description above it. A package's
__init__.py without functions or classes (a docstring, re-exports) is described by its folder's
line and need not be named."""

import ast
import re

from conftest import REPO

# Folders whose .py files must each have a line; configs/ and scripts/ name every file.
PY_FOLDERS = ("htcl", "htcl/sample_world", "ray_jobs", "serving", "feature_repo", "benchmarks", "scripts", "tests")
ALL_FILE_FOLDERS = ("configs", "scripts")
CONTINUATION_INDENT = 10  # names sit at 0, 2, 4 spaces; descriptions continue much further right


def layout_block(readme: str) -> list[str]:
    section = readme.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    fenced = re.search(r"^```\n(.*?)^```$", section, flags=re.MULTILINE | re.DOTALL)
    assert fenced, "no fenced code block in the README's Layout section"
    return fenced.group(1).splitlines()


def layout_names(lines: list[str]) -> tuple[set[str], set[str]]:
    """The files and the folders the block names, as paths relative to the repository root."""
    files, folders, parents = set(), set(), []
    for line in lines:
        indent = len(line) - len(line.lstrip(" "))
        if not line.strip() or indent >= CONTINUATION_INDENT:
            continue
        assert indent % 2 == 0, f"a name indented by an odd number of spaces: {line!r}"
        depth = indent // 2
        assert depth <= len(parents), f"indented deeper than its folder: {line!r}"
        name = line.split()[0]
        path = "/".join([*parents[:depth], name.rstrip("/")])
        if name.endswith("/"):
            folders.add(path)
            parents[depth:] = [name.rstrip("/")]
        else:
            files.add(path)
            parents[depth:] = []
    return files, folders


def package_marker(path) -> bool:
    tree = ast.parse(path.read_text())
    return path.name == "__init__.py" and not any(
        isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) for node in tree.body
    )


def files_that_need_a_line() -> set[str]:
    paths = {p for folder in PY_FOLDERS for p in (REPO / folder).glob("*.py") if not package_marker(p)}
    paths |= {p for folder in ALL_FILE_FOLDERS for p in (REPO / folder).iterdir() if p.is_file()}
    return {str(p.relative_to(REPO)) for p in paths if not p.name.startswith(".")}


def test_the_layout_block_parses_as_a_tree():
    files, folders = layout_names(
        ["a/      x", "  b.py  y", "  c/    z", "    d.py w", "                more", "e.yaml  v"]
    )
    assert files == {"a/b.py", "a/c/d.py", "e.yaml"}
    assert folders == {"a", "a/c"}


def test_the_readme_layout_names_every_file_and_only_files_that_exist():
    files, folders = layout_names(layout_block((REPO / "README.md").read_text()))
    unnamed = sorted(files_that_need_a_line() - files)
    missing = sorted(p for p in files if not (REPO / p).is_file()) + sorted(
        f"{p}/" for p in folders if not (REPO / p).is_dir()
    )
    assert unnamed == [], f"files the README's Layout does not name: {unnamed}"
    assert missing == [], f"the README's Layout names what does not exist: {missing}"


def test_the_readme_layout_fits_120_columns():
    too_wide = [line for line in layout_block((REPO / "README.md").read_text()) if len(line) > 120]
    assert too_wide == []
