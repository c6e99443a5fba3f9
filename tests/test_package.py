"""The package's import structure: the math imports no transformers, and the lazy public names stay functions."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import svdkit


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


def svdkit_imports() -> dict[str, set[str]]:
    """Module -> the svdkit modules it imports at run time (relative imports anywhere in the file, function-level
    included, `if TYPE_CHECKING:` blocks excluded)."""
    root = Path(svdkit.__file__).parent
    files = {".".join(f.relative_to(root.parent).with_suffix("").parts).removesuffix(".__init__"): f
             for f in root.rglob("*.py")}
    graph = {}
    for name, f in files.items():
        package = name if f.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        tree = ast.parse(f.read_text(encoding="utf-8"))
        # imports under `if TYPE_CHECKING:` never run: they are for annotations only, not part of the import graph
        typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                       and getattr(block.test, "id", getattr(block.test, "attr", None)) == "TYPE_CHECKING"
                       for stmt in block.body for n in ast.walk(stmt)}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level and id(node) not in typing_only:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(parts + ([node.module] if node.module else []))
                deps |= {t for t in (target, *(f"{target}.{a.name}" for a in node.names)) if t in files}
        graph[name] = deps - {name, "svdkit"}  # the lazy package root re-exports, it imports nothing eagerly
    return graph


def test_svdkit_modules_import_each_other_without_cycles():
    graph = svdkit_imports()
    assert {"svdkit.layout", "svdkit.methods.base"} <= graph["svdkit.compression"]  # the parse sees the imports
    assert "svdkit.linalg" in graph["svdkit.methods.asvd"] and "svdkit.kvcache" in graph["svdkit.io"]
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> None:
        assert node not in path, f"import cycle: {' -> '.join([*path[path.index(node):], node])}"
        if node not in done:
            for dep in sorted(graph[node]):
                visit(dep, [*path, node])
            done.add(node)

    for node in sorted(graph):
        visit(node, [])


def test_modules_and_functions_stay_small():
    """The layout a newcomer reads: no module over 450 lines, and no function over 60 except the command line's
    parser table and `compress` (plan, walk, report, with its argument checks)."""
    root = Path(svdkit.__file__).parent
    allowed = {("cli_args.py", "build_parser"), ("compression.py", "compress")}
    long_modules, long_functions = [], []
    for path in sorted(root.rglob("*.py")):
        source = path.read_text(encoding="utf-8")
        if source.count("\n") > 450:
            long_modules.append(str(path.relative_to(root)))
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno - node.lineno >= 60:
                if (path.name, node.name) not in allowed:
                    long_functions.append(f"{path.relative_to(root)}:{node.name}")
    assert not long_modules and not long_functions, (long_modules, long_functions)
