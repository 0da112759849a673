"""core/ decides masks and must stay free of distributed, DeepSpeed and DALI code: checked on the real
import graph. Every import a core module makes (at any depth of its code) is followed through the
rigl_ds modules it reaches when imported (their import-time statements, parent packages included),
so an indirect route such as core -> rigl_ds.engines.dist_utils -> torch.distributed is caught."""
from __future__ import annotations

import ast
import pathlib

import rigl_ds

PKG = pathlib.Path(rigl_ds.__file__).parent
FORBIDDEN = ("torch.distributed", "deepspeed", "nvidia.dali", "rigl_ds.engines.ddp", "rigl_ds.engines.deepspeed",
             "rigl_ds.engines.fsdp2", "rigl_ds.engines.dist_select", "rigl_ds.engines.dist_utils")


def _file(module: str) -> pathlib.Path | None:
    """The source of a rigl_ds module (a package's __init__.py), None outside rigl_ds."""
    if module != "rigl_ds" and not module.startswith("rigl_ds."):
        return None
    base = PKG.parent.joinpath(*module.split("."))
    for f in (base.with_suffix(".py"), base / "__init__.py"):
        if f.is_file():
            return f
    return None


def _imports(tree: ast.Module, module: str, is_pkg: bool, import_time_only: bool) -> list[str]:
    """Absolute names of the modules a module's code imports (``from x import y``: x and x.y)."""
    package = module if is_pkg else module.rpartition(".")[0]
    out: list[str] = []

    def visit(node: ast.AST) -> None:
        if import_time_only and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            return                                  # not run when the module is imported
        if isinstance(node, ast.Import):
            out.extend(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1])
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module or ""
            out.append(mod)
            out.extend(f"{mod}.{a.name}" for a in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return out


def forbidden_route(start: str, source: str | None = None) -> list[str] | None:
    """The import chain from ``start`` (a core module, or ``source`` as if it were one: all of its
    imports) to a forbidden module, or None."""
    f = _file(start)
    text = source if source is not None else f.read_text()
    first = _imports(ast.parse(text), start, f is not None and f.name == "__init__.py", import_time_only=False)
    seen: set[str] = set()
    stack = [(m, [start, m]) for m in first]
    while stack:
        mod, route = stack.pop()
        if mod.startswith(FORBIDDEN):
            return route
        if mod in seen:
            continue
        seen.add(mod)
        parts = mod.split(".")
        for i in range(1, len(parts)):              # importing a.b.c runs a and a.b first
            stack.append((".".join(parts[:i]), route[:-1] + [".".join(parts[:i])]))
        path = _file(mod)
        if path is None:
            continue
        for m in _imports(ast.parse(path.read_text()), mod, path.name == "__init__.py", import_time_only=True):
            stack.append((m, route + [m]))
    return None


def test_core_imports_nothing_distributed_directly_or_through_other_modules():
    files = sorted((PKG / "core").glob("*.py"))
    assert len(files) >= 7
    for path in files:
        module = "rigl_ds.core" if path.name == "__init__.py" else f"rigl_ds.core.{path.stem}"
        route = forbidden_route(module)
        assert route is None, " -> ".join(route)


def test_the_check_catches_planted_imports():
    for planted in ("from rigl_ds.engines.dist_utils import broadcast_masks\n",
                    "def f():\n    from rigl_ds.engines import ddp\n",
                    "import rigl_ds.engines.fsdp2 as f\n",
                    "from ..engines import dist_select\n",
                    "import torch.distributed as dist\n"):
        route = forbidden_route("rigl_ds.core.selection", source=planted)
        assert route is not None and route[-1].startswith(FORBIDDEN), (planted, route)
    # through a module outside core: followed into what it imports when imported, not into its functions


def test_the_check_follows_modules_outside_core(tmp_path):
    real = _file
    planted = {"rigl_ds.eager": "import os\nfrom rigl_ds.engines.dist_utils import broadcast_masks\n",
               "rigl_ds.lazy": "def f():\n    from rigl_ds.engines.dist_utils import broadcast_masks\n"}
    for name, text in planted.items():
        (tmp_path / f"{name}.py").write_text(text)
    globals()["_file"] = lambda m: tmp_path / f"{m}.py" if m in planted else real(m)
    try:
        route = forbidden_route("rigl_ds.core.selection", source="from rigl_ds import eager\n")
        assert route[:2] == ["rigl_ds.core.selection", "rigl_ds.eager"], route
        assert route[-1].startswith("rigl_ds.engines.dist_utils"), route
        assert forbidden_route("rigl_ds.core.selection", source="from rigl_ds import lazy\n") is None
    finally:
        globals()["_file"] = real
