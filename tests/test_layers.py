"""The project's layer order, read from the source (imports, via the AST), not from memory.

Bottom to top; a module may import its own layer and the layers below, never above:

0. core utilities: colour maths, atomic files, resume state, paths, the private-API shims
1. ``layerdiff.models``: plain ``nn.Module``s and the base-model loaders
2. the maths of training: losses, the diffusion step, metrics, keying, optimizers, sharding
3. file formats: checkpoints, the LayerDiffuse VAE files, LoRA layouts, mattes, the export and evaluate CLIs
4. ``layerdiff.pipelines``: generation
5. ``layerdiff.modules``: one LightningModule per objective
6. ``data`` and ``callbacks``
(7. ``train.py``, the composition root; ``scripts/``, ``benchmarks/`` and ``tests/`` use anything.)

No import cycles inside these packages (lazy imports inside functions count too), nothing
under ``layerdiff/`` knows a ``configs/`` path, and no source file is over 400 lines.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("layerdiff", "data", "callbacks")
MAX_LINES = 400

# Longest matching prefix wins: "layerdiff.models" before "layerdiff".
LAYERS: dict[str, int] = {
    "layerdiff": 0,
    "layerdiff.rgba": 0,
    "layerdiff.files": 0,
    "layerdiff.resume": 0,
    "layerdiff.paths": 0,
    "layerdiff.checkpointing": 0,
    "layerdiff.compat": 0,
    "layerdiff.batches": 0,
    "layerdiff.models": 1,
    "layerdiff.losses": 2,
    "layerdiff.diffusion": 2,
    "layerdiff.metrics": 2,
    "layerdiff.keying": 2,
    "layerdiff.optim": 2,
    "layerdiff.distributed": 2,
    "layerdiff.formats": 3,
    "layerdiff.export": 3,
    "layerdiff.export_lora": 3,
    "layerdiff.evaluate": 3,
    "layerdiff.pipelines": 4,
    "layerdiff.modules": 5,
    "data": 6,
    "callbacks": 6,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def source_files() -> dict[str, Path]:
    return {module_name(path): path for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))}


def layer_of(module: str) -> int:
    matches = [prefix for prefix in LAYERS if module == prefix or module.startswith(prefix + ".")]
    if not matches:
        raise AssertionError(f"{module} has no layer: add it to LAYERS in {Path(__file__).name}")
    return LAYERS[max(matches, key=len)]


def project_imports(path: Path, modules: set[str]) -> list[tuple[str, int]]:
    """``(imported project module, line)`` for every import in the file, lazy ones included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            submodules = [f"{node.module}.{alias.name}" for alias in node.names]
            names = [name for name in submodules if name in modules] or [node.module]
        else:
            continue
        for name in names:
            # "import a.b.c" of a non-module attribute path: the longest module prefix
            while name and name not in modules and "." in name:
                name = name.rsplit(".", 1)[0]
            if name in modules:
                found.append((name, node.lineno))
    return found


def import_graph() -> dict[str, list[tuple[str, int]]]:
    files = source_files()
    return {module: project_imports(path, set(files)) for module, path in files.items()}


def test_every_module_has_a_layer() -> None:
    for module in source_files():
        layer_of(module)


def test_nothing_imports_a_higher_layer() -> None:
    files = source_files()
    violations = [
        f"{files[module].relative_to(ROOT)}:{line}: {module} (layer {layer_of(module)}) imports "
        f"{imported} (layer {layer_of(imported)})"
        for module, imports in import_graph().items()
        for imported, line in imports
        if layer_of(imported) > layer_of(module)
    ]
    assert not violations, "imports against the layer order:\n" + "\n".join(violations)


def test_no_import_cycles() -> None:
    graph = {module: sorted({imported for imported, _ in imports if imported != module})
             for module, imports in import_graph().items()}
    files = source_files()
    lines = {(module, imported): line for module, imports in import_graph().items() for imported, line in imports}
    cycles = []
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(module: str) -> None:
        state[module] = "open"
        stack.append(module)
        for imported in graph[module]:
            if state.get(imported) == "open":
                cycle = stack[stack.index(imported):] + [imported]
                cycles.append(" -> ".join(
                    f"{a} ({files[a].relative_to(ROOT)}:{lines[(a, b)]})" for a, b in zip(cycle, cycle[1:])
                ) + f" -> {imported}")
            elif imported not in state:
                visit(imported)
        stack.pop()
        state[module] = "done"

    for module in graph:
        if module not in state:
            visit(module)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_library_knows_no_recipe_paths() -> None:
    # Recipes sit above the library: a message names the option to set, not a file in configs/.
    found = [
        f"{path.relative_to(ROOT)}:{node.lineno}: {node.value.strip()[:80]!r}"
        for path in sorted((ROOT / "layerdiff").rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and "configs/" in node.value
    ]
    assert not found, "configs/ paths inside layerdiff/:\n" + "\n".join(found)


@pytest.mark.parametrize("package", PACKAGES)
def test_no_source_file_is_over_the_size_limit(package: str) -> None:
    too_long = [
        f"{path.relative_to(ROOT)}: {count} lines"
        for path in sorted((ROOT / package).rglob("*.py"))
        if (count := len(path.read_text().splitlines())) > MAX_LINES
    ]
    assert not too_long, f"over {MAX_LINES} lines (split by concern):\n" + "\n".join(too_long)


def test_the_checker_sees_an_upward_import(tmp_path: Path) -> None:
    # The reader must find lazy imports and from-imports of submodules, or the tests above pass vacuously.
    source = tmp_path / "probe.py"
    source.write_text("def f():\n    from layerdiff import modules\n    import callbacks.ema\n")
    modules = {"layerdiff", "layerdiff.modules", "callbacks", "callbacks.ema"}
    assert project_imports(source, modules) == [("layerdiff.modules", 2), ("callbacks.ema", 3)]


def test_ruff_finds_nothing() -> None:
    # The lint rules live in pyproject.toml ([tool.ruff]); the suite keeps the tree clean of them.
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
