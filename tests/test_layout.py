"""Imports run one way between stages: graph_passes knows nothing of cp_onnx; the evaluation engine (cp_onnx/models)
sits below analysis and ground truth; analysis and ground truth import neither each other. Read from the source's
syntax trees, so an import inside a function counts as much as one at the top."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(path: Path, root: Path = ROOT) -> set[str]:
    """Every module ``path`` imports, relative imports resolved against its package."""
    package = ".".join(path.relative_to(root).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)  # `from cp_onnx import analysis`
    return found


def importers(folder: str, forbidden: tuple[str, ...], root: Path = ROOT) -> list[str]:
    return sorted(f"{path.relative_to(root)} imports {module}"
                  for path in (root / folder).rglob("*.py")
                  for module in imported_modules(path, root)
                  if any(module == f or module.startswith(f + ".") for f in forbidden))


@pytest.mark.parametrize("folder, forbidden", [
    ("cp_onnx/groundtruth", ("cp_onnx.analysis",)),
    ("cp_onnx/analysis", ("cp_onnx.groundtruth",)),
    ("cp_onnx/models", ("cp_onnx.analysis", "cp_onnx.groundtruth", "cp_onnx.outputs")),
    ("graph_passes", ("cp_onnx", "exporters")),
])
def test_stages_import_one_way(folder, forbidden):
    assert (ROOT / folder).is_dir()
    assert importers(folder, forbidden) == []


def test_the_check_sees_an_import_inside_a_function(tmp_path):
    """The walk must catch what it forbids, relative and absolute, at any depth (a copy of the layout in tmp_path)."""
    package = tmp_path / "cp_onnx" / "groundtruth"
    package.mkdir(parents=True)
    (package / "late.py").write_text("def late():\n    from ..analysis import predict\n    import cp_onnx.analysis.scores\n"
                                     "    from . import probes\n")
    found = importers("cp_onnx/groundtruth", ("cp_onnx.analysis",), root=tmp_path)
    assert found == ["cp_onnx/groundtruth/late.py imports cp_onnx.analysis",
                     "cp_onnx/groundtruth/late.py imports cp_onnx.analysis.predict",
                     "cp_onnx/groundtruth/late.py imports cp_onnx.analysis.scores"]
