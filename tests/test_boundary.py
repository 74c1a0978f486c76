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


def test_feature_repo_does_not_import_htcl():
    offenders = [
        str(p.relative_to(REPO))
        for p in sorted((REPO / "feature_repo").rglob("*.py"))
        if "htcl" in set(imported_roots(p))
    ]
    assert offenders == []
