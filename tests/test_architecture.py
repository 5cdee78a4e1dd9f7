"""The package's layering, read statically from every import in ``src/linfusion`` (function-level ones too).

- no import cycle between modules (an import of ``a.b.c`` also runs ``a`` and ``a.b``, which counts
  unless they are packages of the importer itself);
- no private name (``_x``) imported from another module;
- nothing imports upward: each module has a layer (docs/architecture.md) and may import lower layers
  or its own package only;
- ``linfusion --help`` and every ``linfusion COMMAND --help`` import neither torch nor diffusers (nor
  transformers, numpy or gradio).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "linfusion"

# Lower numbers are lower layers; the longest matching prefix decides (docs/architecture.md).
LAYERS = {
    "linfusion.ops": 0,
    "linfusion.choices": 0,
    "linfusion.io": 0,
    "linfusion.lazy": 0,
    "linfusion.tracing": 0,
    "linfusion.hub": 0,
    "linfusion.errors": 0,
    "linfusion.images": 1,
    "linfusion.runtime": 0,
    "linfusion.patches.base": 0,
    "linfusion.attention": 1,
    "linfusion.vae_attention": 1,
    "linfusion.banding": 1,
    "linfusion.registry": 2,
    "linfusion.bundled": 2,
    "linfusion.model": 3,
    "linfusion.tiled_vae": 3,
    "linfusion.patches": 4,
    "linfusion.parallel": 4,
    "linfusion.planner": 5,
    "linfusion.pipelines": 6,
    "linfusion.testing": 7,
    "linfusion.app": 8,
    "linfusion.distill": 8,
    "linfusion.bench": 9,
    "linfusion.ui": 9,  # the web UI: started by the ui command of linfusion.cli
    "linfusion.cli": 10,
    "linfusion.__main__": 11,
    "linfusion": 12,  # the package root: the public API, resolved lazily
}


def module_files() -> dict[str, Path]:
    files = {}
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        files[".".join(parts)] = path
    return files


def resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(modules: dict[str, Path]) -> list[tuple[str, str, str | None]]:
    """(importer, imported module, imported name or None) for every linfusion import."""
    found = []
    for module, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found += [
                    (module, alias.name, None) for alias in node.names if alias.name.startswith(PACKAGE)
                ]
            elif isinstance(node, ast.ImportFrom):
                target = resolve(module, is_package, node)
                if target == PACKAGE or target.startswith(PACKAGE + "."):
                    for alias in node.names:
                        submodule = f"{target}.{alias.name}"
                        if submodule in modules:
                            found.append((module, submodule, None))
                        else:
                            found.append((module, target, alias.name))
    return found


def layer_of(module: str) -> int:
    best = max((prefix for prefix in LAYERS if module == prefix or module.startswith(prefix + ".")), key=len)
    return LAYERS[best]


def package_of(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2])


def test_no_import_cycles() -> None:
    modules = module_files()
    graph: dict[str, set[str]] = {module: set() for module in modules}
    for importer, imported, _ in imports_of(modules):
        parts = imported.split(".")
        for end in range(1, len(parts) + 1):  # importing a.b.c runs a and a.b first ...
            target = ".".join(parts[:end])
            own_package = importer.startswith(target + ".")  # ... except the importer's own packages
            if target in modules and target != importer and not own_package:
                graph[importer].add(target)
    cycles = strongly_connected(graph)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(sorted(c)) for c in cycles)


def strongly_connected(graph: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's algorithm: the components of more than one module (each is a cycle)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(component)

    sys.setrecursionlimit(10_000)
    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_no_private_names_across_modules() -> None:
    offenders = [
        f"{importer} imports {name} from {imported}"
        for importer, imported, name in imports_of(module_files())
        if name is not None and name.startswith("_") and not name.startswith("__") and imported != importer
    ]
    assert not offenders, "\n".join(offenders)


def test_nothing_imports_upward() -> None:
    offenders = []
    for importer, imported, name in imports_of(module_files()):
        if imported == PACKAGE and name == "__version__":
            continue  # the one constant the package root holds
        if package_of(importer) == package_of(imported):
            continue
        if layer_of(imported) >= layer_of(importer):
            offenders.append(
                f"{importer} (layer {layer_of(importer)}) imports {imported} (layer {layer_of(imported)})"
            )
    assert not offenders, "\n".join(offenders)


def test_every_module_has_a_layer() -> None:
    unplaced = [
        module for module in module_files() if module != PACKAGE and layer_of(module) == LAYERS[PACKAGE]
    ]
    assert not unplaced, f"add these to LAYERS (and docs/architecture.md): {unplaced}"


HELP_PROBE = """
import json, sys
from linfusion.cli import main
try:
    main({argv!r})
except SystemExit:
    pass
heavy = sorted(name for name in ("torch", "diffusers", "transformers", "numpy", "gradio") if name in sys.modules)
print(json.dumps(heavy), file=sys.stderr)
"""


def commands() -> list[list[str]]:
    from linfusion.cli import build_parser

    parser = build_parser()
    subparsers = next(
        action for action in parser._actions if action.__class__.__name__ == "_SubParsersAction"
    )
    found = [["--help"]]
    for name, sub in subparsers.choices.items():
        found.append([name, "--help"])
        for action in sub._actions:
            if action.__class__.__name__ == "_SubParsersAction":
                found += [[name, inner, "--help"] for inner in action.choices]
    return found


@pytest.mark.parametrize("argv", commands(), ids=lambda argv: " ".join(argv))
def test_help_imports_neither_torch_nor_diffusers(argv: list[str]) -> None:
    done = subprocess.run(
        [sys.executable, "-c", HELP_PROBE.format(argv=argv)], capture_output=True, text=True, timeout=60
    )
    assert "usage:" in done.stdout
    heavy = json.loads(done.stderr.strip().splitlines()[-1])
    assert heavy == [], f"linfusion {' '.join(argv)} imported {heavy}"


# One job per module: past these sizes a file or a function usually holds two (DEVELOPERS' style rules).
MAX_FILE_LINES = 800
MAX_FUNCTION_LINES = 150
# Files allowed past MAX_FILE_LINES, each with its reason (none today).
LONG_FILES: dict[str, str] = {}


def test_no_file_or_function_too_long() -> None:
    too_long = []
    for module, path in module_files().items():
        source = path.read_text()
        lines = source.count("\n") + 1
        if lines > MAX_FILE_LINES and module not in LONG_FILES:
            too_long.append(f"{module}: {lines} lines (at most {MAX_FILE_LINES})")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    too_long.append(f"{module}.{node.name}: {length} lines (at most {MAX_FUNCTION_LINES})")
    assert not too_long, "split by job:\n" + "\n".join(too_long)


def test_only_ops_imports_the_reference_kernels() -> None:
    """Every engine calls the kernel dispatcher of ``linfusion.ops``, never the slow oracle directly."""
    offenders = [
        importer
        for importer, imported, _ in imports_of(module_files())
        if imported == "linfusion.ops.reference" and not importer.startswith("linfusion.ops")
    ]
    assert not offenders, f"import from linfusion.ops instead: {sorted(set(offenders))}"


def test_one_user_error_class() -> None:
    """One hierarchy of user mistakes: every ``UserError`` the CLI and the web page show derives from one class."""
    defined = [
        module
        for module, path in module_files().items()
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ClassDef) and node.name == "UserError"
    ]
    assert defined == ["linfusion.errors"], defined
