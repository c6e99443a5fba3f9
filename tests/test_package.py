"""The package's import structure: the math imports no transformers, and the lazy public names stay functions."""

import subprocess
import sys

import pytest


def run(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()


@pytest.mark.parametrize("modules", ["svdkit.linalg, svdkit.methods", "svdkit.allocation, svdkit.specs, svdkit.report"])
def test_pure_modules_import_no_transformers(modules):
    assert run(f"import sys, {modules}; print('transformers' in sys.modules)") == "False"


@pytest.mark.parametrize("argv", [["--help"], ["compress", "--help"], ["sweep", "--help"],
                                  ["compress", "--ratio", "2"]])
def test_the_cli_parses_and_answers_before_importing_torch(argv):
    """Help and argument errors come from the parser alone: neither torch nor transformers is imported."""
    out = run(f"import sys\nfrom svdkit.cli import main\ncode = main({argv!r})\n"
              "print(code, 'torch' in sys.modules, 'transformers' in sys.modules)")
    assert out.splitlines()[-1] == f"{2 if '--ratio' in argv else 0} False False"


def test_public_names_are_not_shadowed_by_submodules():
    """Importing every submodule must not replace a lazily exported function by a module of the same name."""
    out = run("import importlib, pkgutil, types, svdkit\n"
              "for m in pkgutil.walk_packages(svdkit.__path__, 'svdkit.'):\n"
              "    if not m.name.endswith('__main__'): importlib.import_module(m.name)\n"
              "print([n for n in svdkit.__all__ if isinstance(getattr(svdkit, n), types.ModuleType)])")
    assert out == "[]"
