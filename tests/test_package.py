"""The package's import structure: the math imports no transformers, and the lazy public names stay functions."""

import subprocess
import sys


def run(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()


def test_pure_modules_and_the_cli_parser_import_nothing_heavy():
    assert run("import sys, svdkit.linalg, svdkit.methods, svdkit.allocation; "
               "print('transformers' in sys.modules)") == "False"
    assert run("import sys\nfrom svdkit.cli import main\nmain(['compress', '--help'])\n"
               "print('torch' in sys.modules, 'transformers' in sys.modules)").splitlines()[-1] == "False False"


def test_public_names_are_not_shadowed_by_submodules():
    """Importing every submodule must not replace a lazily exported function by a module of the same name."""
    out = run("import importlib, pkgutil, types, svdkit\n"
              "for m in pkgutil.walk_packages(svdkit.__path__, 'svdkit.'):\n"
              "    if not m.name.endswith('__main__'): importlib.import_module(m.name)\n"
              "print([n for n in svdkit.__all__ if isinstance(getattr(svdkit, n), types.ModuleType)])")
    assert out == "[]"
