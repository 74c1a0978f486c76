"""htcl/ is the library: it never imports Ray, Feast or Ray Serve (README, Layout). Its one exception
is the composition root, htcl/cli.py: the `htcl` command runs the Ray jobs and the Serve app, and no
other module imports it."""

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
    """Every module path imports, also by name: `importlib.import_module("x")`, `__import__("x")`."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
        elif isinstance(node, ast.Call) and _call_name(node.func) in ("import_module", "__import__") and node.args:
            first = node.args[0]
            yield first.value if isinstance(first, ast.Constant) and isinstance(first.value, str) else "<computed>"


def _call_name(func) -> str | None:
    return func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None


def imported_names(path):
    """imported_modules, plus each `from M import N` as M.N (a submodule or a name of M)."""
    yield from imported_modules(path)
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield from (f"{node.module}.{a.name}" for a in node.names)


COMPOSITION_ROOT = "htcl/cli.py"
EDGES = ("ray_jobs", "serving")  # what only the composition root of htcl may import


def test_only_the_composition_root_imports_the_ray_jobs_and_serving():
    imports = {
        str(p.relative_to(REPO)): {m for m in imported_modules(p) if m.split(".")[0] in EDGES or m == "<computed>"}
        for p in sorted((REPO / "htcl").rglob("*.py"))
    }
    offenders = {path: sorted(mods) for path, mods in imports.items() if mods and path != COMPOSITION_ROOT}
    assert offenders == {}
    # the exception is real: the root names the jobs and the Serve app it runs, none by a computed name
    assert "<computed>" not in imports[COMPOSITION_ROOT]
    assert {m.split(".")[0] for m in imports[COMPOSITION_ROOT]} == set(EDGES)


def test_nothing_imports_the_composition_root():
    """htcl.cli is where the program is put together: the library, the jobs, the Serve app and the
    feature repo import what they need from htcl's other modules, never from it."""
    offenders = [
        f"{p.relative_to(REPO)} imports {name}"
        for package in ("htcl", "ray_jobs", "serving", "feature_repo")
        for p in sorted((REPO / package).rglob("*.py"))
        if str(p.relative_to(REPO)) != COMPOSITION_ROOT
        for name in imported_names(p)
        if name == "htcl.cli" or name.startswith("htcl.cli.")
    ]
    assert offenders == []


PARSERS_WITHOUT_RAY = f"""
import sys

class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {(*BLOCKED, *EDGES)!r}:
            raise ImportError(f"the htcl parser and --local paths must not import {{name}}")
        return None

sys.meta_path.insert(0, Blocker())
from htcl.cli import build_parser, main

parser = build_parser()
parser.format_help()
for step in ("preprocess", "features", "pretrain", "finetune", "embed", "evaluate", "demo"):
    parser.parse_args([step, "--local"])
    try:
        parser.parse_args([step, "--help"])
    except SystemExit as e:
        assert e.code == 0, step
assert main(["pretrain", "--local", "--config", "configs/demo.yaml", "pretrain.batchsize=3"]) == 2
print("ok")
"""


def test_htcl_help_and_local_parsing_load_no_ray_feast_jobs_or_serving():
    res = subprocess.run([sys.executable, "-c", PARSERS_WITHOUT_RAY], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().endswith("ok")


ONE_PARSER_PER_STEP = """
import argparse, json
from htcl.cli import JOBS, build_parser, job_main
import ray_jobs.train_loop as train_loop

def options(parser):
    return {a.option_strings[0] if a.option_strings else a.dest for a in parser._actions}

subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
modules, mismatched = {}, {}
for step in JOBS:
    main = job_main(step)
    modules[step] = main.__module__
    module = __import__(main.__module__, fromlist=["build_parser"])
    job = train_loop.build_parser(step) if step in ("pretrain", "finetune") else module.build_parser()
    cli = subparsers[step]
    if cli.add_help:  # a step `htcl` parses itself (--local): the job's options plus --local
        extra = options(cli) - options(job) - {"--local"}
        if extra:
            mismatched[step] = sorted(extra)
print(json.dumps({"modules": modules, "mismatched": mismatched}))
"""


def test_each_step_of_htcl_runs_its_job_and_parses_a_subset_of_its_options():
    """`htcl <step>` runs ray_jobs.<step>.main; where `htcl <step> --local` parses the step itself,
    its parser takes the job's options (the same definitions) plus --local and nothing else."""
    import json

    res = subprocess.run([sys.executable, "-c", ONE_PARSER_PER_STEP], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    found = json.loads(res.stdout.strip().splitlines()[-1])
    assert found["modules"] == {step: f"ray_jobs.{step.replace('-', '_')}" for step in found["modules"]}
    assert len(found["modules"]) == 9
    assert found["mismatched"] == {}


FEATURE_REPO_HTCL_MODULES = {"schema", "layout", "files"}  # the column names; the output tree; atomic writes


def test_feature_repo_imports_of_htcl_only_the_data_contract():
    """The Feast CLI imports every file of the repo folder: of htcl, they may use only the column
    names (htcl.schema: pyarrow, no model code), where the outputs live (htcl.layout: the standard
    library) and the atomic file writer (htcl.files: the standard library), so the repo loads
    without torch."""
    offenders = [
        f"{p.relative_to(REPO)} imports {module}"
        for p in sorted((REPO / "feature_repo").rglob("*.py"))
        for module in imported_modules(p)
        if module.split(".")[0] == "htcl"
        and module not in {f"htcl.{m}" for m in FEATURE_REPO_HTCL_MODULES}
        and not (module == "htcl" and _imports_only_data_contract(p))
    ]
    assert offenders == []


def test_the_data_contract_imports_only_pyarrow_and_the_standard_library():
    for name in sorted(FEATURE_REPO_HTCL_MODULES):
        roots = set(imported_roots(REPO / "htcl" / f"{name}.py"))
        stdlib = {"__future__", "dataclasses", "hashlib", "os", "pathlib", "typing", "uuid"}
        assert roots <= stdlib | {"pyarrow"}, (name, roots)


def _imports_only_data_contract(path) -> bool:
    """`from htcl import schema [as S]` (or layout) and nothing else from the package."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names = [
        a.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module == "htcl"
        for a in node.names
    ]
    return set(names) <= FEATURE_REPO_HTCL_MODULES


# --- the output layout ----------------------------------------------------------------------

LAYOUT_MODULE = "htcl/layout.py"
SOURCE_DIRS = ("htcl", "ray_jobs", "serving", "feature_repo", "benchmarks", "scripts")
PATH_CALLS = {"Path", "PurePath", "PosixPath", "joinpath", "join", "out_path"}


def layout_names() -> set[str]:
    """The names htcl.layout owns: its folders, the training runs' folders and the checkpoint file."""
    from htcl import layout

    runs = {layout.run_name(stage, variant) for stage in ("pretrain", "finetune") for variant in ("favor", "cf")}
    return set(layout.NAMES) | runs | {layout.CHECKPOINT}


def _strings(node):
    """The literal text of a path part: a str constant, or the literal pieces of an f-string."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        yield node.value
    elif isinstance(node, ast.JoinedStr):
        yield from (v.value for v in node.values if isinstance(v, ast.Constant) and isinstance(v.value, str))


def path_parts(tree):
    """(line, text) of every literal that becomes part of a path: an operand of `/`, or an argument
    of Path(...), PurePath, .joinpath, os.path.join or out_path."""
    for node in ast.walk(tree):
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            candidates = (node.left, node.right)
        elif isinstance(node, ast.Call) and _call_name(node.func) in PATH_CALLS:
            if isinstance(node.func, ast.Attribute) and isinstance(node.func.value, ast.Constant):
                continue  # "sep".join(...): a string join, not a path
            candidates = node.args
        else:
            continue
        for c in candidates:
            yield from ((c.lineno, text) for text in _strings(c))


def layout_literals(source: str, filename: str = "<source>") -> list[tuple[int, str]]:
    names = layout_names()
    return [
        (line, text)
        for line, text in path_parts(ast.parse(source, filename=filename))
        if any(segment in names for segment in text.replace("\\", "/").split("/"))
    ]


def test_the_layout_check_finds_a_path_spelled_by_hand():
    for spelled in (
        'Path(cfg.output_dir, "embeddings", v)',
        'Path(cfg.output_dir) / "rankers" / version',
        'out / "feast"',
        'os.path.join(out, "mels")',
        'root.joinpath("index", v)',
        'Path(f"{out}/quarantine/x.parquet")',
        'run_dir / "model.pt"',
        'out / "finetune_cf"',
        'out_path(cfg, "evaluation", "results.md")',
    ):
        assert layout_literals(spelled), spelled
    for fine in ('", ".join(["mels"])', 'out["embeddings"]', 'index_dir / "index.json"', 'print("mels")'):
        assert not layout_literals(fine), fine


def test_only_htcl_layout_spells_the_output_tree():
    """Every reader and writer of the output tree takes its paths from htcl.layout.Layout: none of
    the names it owns appears as a literal part of a path anywhere else (the tests spell the tree
    on their own, as its specification)."""
    offenders = [
        f"{p.relative_to(REPO)}:{line}: {text!r}"
        for d in SOURCE_DIRS
        if (REPO / d).is_dir()
        for p in sorted((REPO / d).rglob("*.py"))
        if str(p.relative_to(REPO)) != LAYOUT_MODULE
        for line, text in layout_literals(p.read_text(), str(p))
    ]
    assert offenders == []


def htcl_import_graph(sources: dict[str, str]) -> dict[str, set[str]]:
    """module -> the htcl modules it imports, at module level or inside a function (an import
    inside a function still makes a cycle, only a later-resolved one)."""
    graph: dict[str, set[str]] = {}
    for name, source in sources.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ImportFrom) and node.module == "htcl":
                deps |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("htcl."):
                deps.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                deps |= {a.name.split(".")[1] for a in node.names if a.name.startswith("htcl.")}
        graph[name] = deps & set(sources) - {name}
    return graph


def import_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph (its modules in order, the first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return path[path.index(dep) :] + [dep]
            if dep not in state and (found := visit(dep, path + [dep])):
                return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start, [start])):
            return found
    return None


def test_htcls_modules_import_each_other_without_a_cycle():
    assert import_cycle(htcl_import_graph({"a": "from htcl import b", "b": "def f():\n    from htcl.a import x"})) == [
        "a",
        "b",
        "a",
    ]
    sources = {p.stem: p.read_text() for p in (REPO / "htcl").glob("*.py") if p.stem != "__init__"}
    cycle = import_cycle(htcl_import_graph(sources))
    assert cycle is None, "htcl modules import each other in a cycle: " + " -> ".join(cycle)
