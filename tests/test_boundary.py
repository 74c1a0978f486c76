"""htcl/ is the library: it never imports Ray, Feast or Ray Serve (README, Layout)."""

import ast
import subprocess
import sys

from conftest import REPO

BLOCKED = ("ray", "feast")

IMPORT_ALL_WITH_BLOCKER = f"""
import importlib, pkgutil, sys

class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            raise ImportError(f"htcl must not import {{name}}")
        return None

sys.meta_path.insert(0, Blocker())
import htcl
# __main__ modules run their CLI when imported; they are entry points, not library code.
names = [m.name for m in pkgutil.walk_packages(htcl.__path__, "htcl.") if not m.name.endswith(".__main__")]
for name in names:
    importlib.import_module(name)
print(len(names))
"""


def test_every_htcl_module_imports_with_ray_and_feast_blocked():
    res = subprocess.run([sys.executable, "-c", IMPORT_ALL_WITH_BLOCKER], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert int(res.stdout.strip().splitlines()[-1]) >= 5


def imported_roots(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module.split(".")[0]


def test_no_htcl_source_file_mentions_ray_or_feast_imports():
    offenders = [
        f"{p.relative_to(REPO)} imports {root}"
        for p in sorted((REPO / "htcl").rglob("*.py"))
        for root in imported_roots(p)
        if root in BLOCKED
    ]
    assert offenders == []


def imported_modules(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module


def test_feature_repo_imports_of_htcl_only_the_data_contract():
    """The Feast CLI imports every file of the repo folder: of htcl, they may use only the column
    names (htcl.schema: pyarrow, no model code), so the repo loads without torch."""
    offenders = [
        f"{p.relative_to(REPO)} imports {module}"
        for p in sorted((REPO / "feature_repo").rglob("*.py"))
        for module in imported_modules(p)
        if module.split(".")[0] == "htcl"
        and module != "htcl.schema"
        and not (module == "htcl" and _imports_only_schema(p))
    ]
    assert offenders == []


def _imports_only_schema(path) -> bool:
    """`from htcl import schema [as S]` and nothing else from the package."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names = [
        a.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module == "htcl"
        for a in node.names
    ]
    return set(names) <= {"schema"}
