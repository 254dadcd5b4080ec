"""Dependencies point one way: the model core, the engine and ``src.eval`` never load onnx; ``src/`` never imports
``bench/`` or ``scripts/``; no two modules import each other, directly or around a loop.

The rules read the syntax tree of every module of the repository, so an import inside a function or under
``if TYPE_CHECKING:`` counts as much as one at the top: both are an edge a reader has to follow, and a
function-level import is the usual way a cycle hides. ``test_float_training_and_eval_load_no_onnx`` checks the
same thing at run time, on a real run.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Set, Tuple

import pytest

from tests.conftest import REPO, common_args

PACKAGES = ("src", "scripts", "bench")
TOP_LEVEL_SCRIPTS = ("train_finetune_npu.py",)
DEPLOYMENT = ("onnx", "onnxruntime", "openvino")
# Model core, engine, flags, the training scripts' --help and eval of a float checkpoint.
ONNX_FREE = ("src.model_factory", "src.checkpoint", "src.npu_blocks", "src.replace_gdn", "src.replace_gdn_npu",
             "src.quant.scheme", "src.quant.fake_quant", "src.engine", "src.train_args", "src.eval",
             "src.train_finetune_relu", "train_finetune_npu")
# The one import from an ONNX_FREE module into the onnx side, inside the function only --qat calls: QAT's calibration
# *is* PTQ (onnxruntime writes the graph whose scales QAT starts from), so --qat true must load it; float training
# must not (test_float_training_and_eval_load_no_onnx runs one and checks). At module level it would count.
QAT_ONLY_EDGES = {("src.engine.setup", "src.quant.qat")}


def module_files(root: Path) -> Dict[str, Path]:
    """Dotted name -> file of every module of the repository at ``root`` (a package is its ``__init__``)."""
    found = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    for name in TOP_LEVEL_SCRIPTS:
        if (root / name).exists():
            found[name[:-3]] = root / name
    return found


def imported_names(path: Path, module: str, is_package: bool) -> List[Tuple[str, int]]:
    """(dotted name, line) of every import in the file, at any depth, relative imports resolved. The line is
    negative for an import inside a function (it runs when the function is called, not when the module loads)."""
    tree = ast.parse(path.read_text(), str(path))
    in_function = {id(inner) for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                   for inner in ast.walk(node)}
    names = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        line = -node.lineno if id(node) in in_function else node.lineno
        if isinstance(node, ast.Import):
            names += [(alias.name, line) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([base] if base else []))
            names += [(base, line)] + [(f"{base}.{alias.name}", line) for alias in node.names]
    return names


def import_graph(root: Path, own_packages: bool = True
                 ) -> Tuple[Dict[str, Dict[str, int]], Dict[str, Dict[str, int]]]:
    """(project module -> project modules it imports, project module -> outside packages it imports), with the
    line of each import. Importing ``a.b.c`` runs ``a`` and ``a.b`` too, so those are edges as well, except, with
    ``own_packages=False``, a module's own enclosing packages, which Python has already started by then (a
    package's ``__init__`` that re-exports its modules is not a cycle; an explicit ``from a.b import x`` in
    ``a/b/c.py`` still is)."""
    files = module_files(root)
    inner: Dict[str, Dict[str, int]] = {name: {} for name in files}
    outer: Dict[str, Dict[str, int]] = {name: {} for name in files}
    for name, path in files.items():
        for target, line in imported_names(path, name, path.name == "__init__.py"):
            parts = target.split(".")
            project = [".".join(parts[:i]) for i in range(1, len(parts) + 1) if ".".join(parts[:i]) in files]
            for hit in project:
                enclosing = name.startswith(hit + ".") and hit != target
                if hit != name and (own_packages or not enclosing):
                    inner[name][hit] = max(inner[name].get(hit, line), line)  # a module-level import wins
            if not project and parts[0]:
                outer[name][parts[0]] = max(outer[name].get(parts[0], line), line)
    return inner, outer


def reachable(inner: Dict[str, Dict[str, int]], start: str,
              deferred: Set[Tuple[str, str]] = frozenset()) -> Dict[str, Optional[str]]:
    """Every module ``start`` loads, transitively: module -> the module that imports it (for the chain).
    An edge in ``deferred`` is not followed where every import behind it sits inside a function."""
    seen: Dict[str, Optional[str]] = {start: None}
    todo = [start]
    while todo:
        here = todo.pop()
        for there, line in inner[here].items():
            if there not in seen and not ((here, there) in deferred and line < 0):
                seen[there] = here
                todo.append(there)
    return seen


def chain(seen: Dict[str, Optional[str]], end: str) -> List[str]:
    path = [end]
    while seen[path[-1]] is not None:
        path.append(seen[path[-1]])
    return path[::-1]


def deployment_imports(root: Path, starts=ONNX_FREE, allowed=QAT_ONLY_EDGES) -> List[str]:
    """Each way a module in ``starts`` (or a package: its modules) reaches onnx / onnxruntime / openvino."""
    inner, outer = import_graph(root)
    found = []
    for start in [m for m in inner if any(m == s or m.startswith(s + ".") for s in starts)]:
        seen = reachable(inner, start, set(allowed))
        for module in seen:
            for package, line in outer[module].items():
                if package in DEPLOYMENT:
                    found.append(f"{' -> '.join(chain(seen, module))} imports {package} (line {abs(line)})")
    return sorted(set(found))


def imports_of_bench_or_scripts(root: Path) -> List[str]:
    inner, _ = import_graph(root)
    return [f"{module} imports {target} (line {abs(line)})" for module, targets in sorted(inner.items())
            if module.split(".")[0] == "src"
            for target, line in targets.items() if target.split(".")[0] in ("bench", "scripts")]


def import_cycles(root: Path) -> List[List[str]]:
    """Strongly connected components of more than one module (Tarjan), each as a sorted list."""
    inner, _ = import_graph(root, own_packages=False)
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    cycles = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for there in inner[node]:
            if there not in index:
                visit(there)
                low[node] = min(low[node], low[there])
            elif there in on_stack:
                low[node] = min(low[node], index[there])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10000))
    for node in inner:
        if node not in index:
            visit(node)
    return sorted(cycles)


@pytest.mark.quick
def test_model_core_engine_and_eval_import_no_onnx():
    assert deployment_imports(REPO) == []


@pytest.mark.quick
def test_src_imports_neither_bench_nor_scripts():
    assert imports_of_bench_or_scripts(REPO) == []


@pytest.mark.quick
def test_no_import_cycles():
    assert import_cycles(REPO) == []


@pytest.mark.quick
def test_the_only_qat_edge_is_still_needed():
    """The exemption names an import that exists, and it does lead to onnx (else it should go)."""
    inner, _ = import_graph(REPO)
    for here, there in QAT_ONLY_EDGES:
        assert there in inner[here], f"{here} no longer imports {there}: drop it from QAT_ONLY_EDGES"
        assert inner[here][there] < 0, f"{here} imports {there} at module level: every run would load onnx"
    assert deployment_imports(REPO, starts=("src.engine",), allowed=()) != []


def plant(root: Path, files: Dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


@pytest.mark.quick
def test_the_rules_catch_planted_violations(tmp_path):
    """A function-level onnx import two modules away, a TYPE_CHECKING cycle, src importing bench: each is reported."""
    root = plant(tmp_path, {
        "src/__init__.py": "",
        "src/model_factory.py": "from src import helpers\n",
        "src/helpers.py": "def session(path):\n    import onnxruntime\n    return onnxruntime.InferenceSession(path)\n",
        "src/eval.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from src.report import Table\n",
        "src/report.py": "from .eval import main\n",
        "src/data.py": "from bench.common import write_report\n",
        "bench/__init__.py": "", "bench/common.py": "", "scripts/__init__.py": "",
    })
    assert deployment_imports(root) == ["src.model_factory -> src.helpers imports onnxruntime (line 2)"]
    assert import_cycles(root) == [["src.eval", "src.report"]]
    assert imports_of_bench_or_scripts(root) == ["src.data imports bench (line 1)", "src.data imports bench.common (line 1)"]
    clean = plant(tmp_path / "clean", {"src/__init__.py": "", "src/model_factory.py": "import torch\n",
                                        "bench/__init__.py": "", "scripts/__init__.py": ""})
    assert deployment_imports(clean) == [] and import_cycles(clean) == [] and imports_of_bench_or_scripts(clean) == []


def test_float_training_and_eval_load_no_onnx(prepared64, tmp_path):
    """At run time: both training scripts' --help, a float training run and ``src.eval`` of its checkpoint, in a
    fresh interpreter, leave onnx, onnxruntime and openvino unloaded."""
    argv = common_args(prepared64, tmp_path, "--recon_count", "0")
    script = f"""
import contextlib, io, runpy, sys
for module in ("src.train_finetune_relu", "train_finetune_npu"):
    sys.argv = [module, "--help"]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
        runpy.run_module(module, run_name="__main__")
from src import eval as recipe_eval, train_finetune_relu
train_finetune_relu.main({argv!r})
recipe_eval.main(["--checkpoint", {str(tmp_path / "ckpt" / "last.pt")!r}, "--coco_dir", {str(prepared64)!r},
                  "--max_images", "1"])
print("LOADED", sorted(m for m in sys.modules if m.split(".")[0] in {DEPLOYMENT!r}))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "LOADED []"
