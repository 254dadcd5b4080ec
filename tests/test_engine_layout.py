"""The engine's shape: flags stop at ``src/engine/setup.py``."""

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.quick  # the edit loop's tier: ./run.sh test -m quick

ENGINE = Path(__file__).resolve().parents[1] / "src" / "engine"


def flag_reads(path: Path):
    """``args.x`` reads, ``args`` parameters and argparse imports in a module: (line, what) for each."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "args":
            found.append((node.lineno, f"args.{node.attr}"))
        elif isinstance(node, ast.arg) and node.arg == "args":
            found.append((node.lineno, "a parameter named args"))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [alias.name for alias in node.names] + [getattr(node, "module", None) or ""]
            if any(name.split(".")[0] == "argparse" for name in names):
                found.append((node.lineno, "import argparse"))
    return found


@pytest.mark.parametrize("module", ["step", "trainer", "loop", "state", "run"])
def test_only_setup_reads_the_flags(module):
    found = flag_reads(ENGINE / f"{module}.py")
    if module == "run":  # run_training(args, ...) is the entry point: it hands the flags to setup unread
        found = [f for f in found if f[1].startswith("args.")]
    assert not found, f"src/engine/{module}.py reads the flags: {found} (convert them in setup.py)"


def test_the_rule_sees_a_flag_read(tmp_path):
    """The check itself: a module that reads a flag is caught, one that only passes a value along is not."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f(args):\n    return args.lr\n")
    good = tmp_path / "good.py"
    good.write_text("def f(lr):\n    return {'args': dict(lr=lr)}['args']\n")
    assert flag_reads(bad) == [(1, "a parameter named args"), (2, "args.lr")]
    assert flag_reads(good) == []
    assert (ENGINE / "setup.py").exists() and flag_reads(ENGINE / "setup.py"), "setup.py is where the flags are read"

