"""cp_onnx and graph_passes import and analyse a model with torch (and transformers, optimum) unimportable."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

from support import write_byte_tokenizer

ROOT = Path(__file__).resolve().parents[1]

BLOCKER = """
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'transformers', 'optimum'):
            raise ImportError(f'{name} is blocked in this test')
sys.meta_path.insert(0, Block())
"""

SCRIPT = BLOCKER + """
import importlib, pkgutil, json
import cp_onnx, graph_passes
for pkg in (cp_onnx, graph_passes):
    for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + '.'):
        importlib.import_module(info.name)
from cp_onnx.cli import main
code = main(['analyze', sys.argv[1], '--out', sys.argv[2], '-n', '6', '--block-sizes', '1,2'])
assert not any(m.split('.')[0] in ('torch', 'transformers', 'optimum') for m in sys.modules), 'torch was imported'
sys.exit(code)
"""


def test_analysis_runs_without_torch(tiny_model, tmp_path):
    _, onnx_path = tiny_model("llama")
    folder = tmp_path / "model"
    folder.mkdir()
    shutil.copy(onnx_path, folder / "model.onnx")
    write_byte_tokenizer(folder)
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(folder), str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert report["model"]["num_layers"] == 3
    assert {"stability", "anomaly", "composite", "boundary"} <= set(report["methods"])


def test_blocker_really_blocks_torch():
    done = subprocess.run([sys.executable, "-c", BLOCKER + "import torch"], capture_output=True, text=True)
    assert done.returncode != 0 and "blocked" in done.stderr
