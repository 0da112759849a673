"""core/ decides masks and must stay free of distributed, DeepSpeed and DALI imports."""
import ast
import pathlib

import rigl_ds.core

FORBIDDEN = ("torch.distributed", "deepspeed", "nvidia.dali", "rigl_ds.engines.ddp", "rigl_ds.engines.deepspeed")


def test_core_imports_nothing_distributed():
    root = pathlib.Path(rigl_ds.core.__file__).parent
    files = sorted(root.glob("*.py"))
    assert len(files) >= 7
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert not name.startswith(FORBIDDEN), f"{path.name} imports {name}"
