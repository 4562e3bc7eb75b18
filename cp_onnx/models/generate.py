"""Greedy generation with an exported or applied model folder: KV-cached through with_past/model.onnx when the
folder has it, otherwise by re-running the whole sequence for every new token."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from cp_onnx import shapes
from cp_onnx.errors import CpOnnxError
from cp_onnx.models.model import ModelFolder
from cp_onnx.models.runner import Runner, cache_feeds, open_graph, run_session
from graph_passes import graph_io
from graph_passes.graph_utils import PAST
from graph_passes.last_position import last_position

# Where a model folder may name its end-of-sequence token, most specific first (the manifest may carry it in future).
_EOS_FILES = ("generation_config.json", "config.json")


def generate(model: ModelFolder, prompt: str, max_new_tokens: int = 32, use_cache: bool = True, *,
             threads: int | None = None, log: Callable[[str], None] = print) -> tuple[str, list[int]]:
    """Greedy continuation of ``prompt``: (decoded new text, new token ids, EOS included if reached)."""
    ids = model.encode([prompt])[0][0]
    if not ids:
        raise CpOnnxError("the prompt tokenizes to nothing; give some text")
    new = generate_ids(model, ids, max_new_tokens, use_cache, threads=threads, log=log)
    return model.tokenizer.decode(new, skip_special_tokens=True), new


def generate_ids(model: ModelFolder, prompt_ids: Sequence[int], max_new_tokens: int = 32, use_cache: bool = True, *,
                 threads: int | None = None, log: Callable[[str], None] = print) -> list[int]:
    """Greedy continuation of token ids; stops after ``max_new_tokens`` or at an EOS token (kept in the result)."""
    if max_new_tokens < 1:
        raise CpOnnxError(f"max_new_tokens must be at least 1, not {max_new_tokens}")
    cached = (with_past_graph(model) or (model.onnx_path if takes_cache(model.onnx_path) else None)) if use_cache else None
    if use_cache and cached is None:
        log(f"{model.path} has no with_past graph: re-running the whole sequence for each token (export with --with-past for a KV cache)")
    runner = generation_runner(cached or model.onnx_path, threads=threads)
    decoder = CachedDecoder(runner, model.manifest) if cached else FullDecoder(runner)
    return greedy(decoder, prompt_ids, max_new_tokens, eos_token_ids(model))


def generation_runner(graph: str | Path, *, threads: int | None = None) -> Runner:
    """A Runner over the graph at ``graph`` that computes the last position's logits only, where the graph allows
    it (``last_position``): generation reads nothing else, and the vocabulary-wide head of every prompt position
    is a large share of a prefill's work."""
    proto, weights = open_graph(graph)
    return Runner(last_position(proto) or proto, threads=threads, weights=weights)


def greedy(decoder: FullDecoder | CachedDecoder, prompt_ids: Sequence[int], max_new_tokens: int, eos: set[int],
           stop: Callable[[list[int]], bool] | None = None) -> list[int]:
    """Greedy continuation through ``decoder``: ends after ``max_new_tokens``, at an EOS token (kept), or once
    ``stop(new ids)`` is true (lm-eval's stop strings)."""
    new: list[int] = []
    logits = decoder.start(list(prompt_ids))
    while True:
        token = int(np.argmax(logits))
        new.append(token)
        if token in eos or len(new) == max_new_tokens or (stop is not None and stop(new)):
            return new
        logits = decoder.step(token)


class FullDecoder:
    """Next-token logits from a no-cache graph (any Runner: a file's, or a routed graph's), re-running the whole sequence each time."""

    def __init__(self, runner: Runner):
        self.runner = runner
        self.ids: list[int] = []

    def start(self, ids: list[int]) -> np.ndarray:
        self.ids = list(ids)
        return self._last_logits()

    def step(self, token: int) -> np.ndarray:
        self.ids.append(token)
        return self._last_logits()

    def _last_logits(self) -> np.ndarray:
        ids = np.array([self.ids], dtype=np.int64)
        return self.runner.run(ids, np.ones_like(ids), ["logits"])["logits"][0, -1]


class CachedDecoder:
    """Next-token logits from a with_past graph's Runner: each step feeds the new token and the previous step's present."""

    def __init__(self, runner: Runner, manifest: dict):
        self.session = session = runner.session
        from_manifest = (manifest.get("num_kv_heads"), manifest.get("head_dim"))
        self.empty = cache_feeds(session.get_inputs(), 1, {**{i.name: from_manifest for i in session.get_inputs()}, **runner.cache_dims})
        known = {"input_ids", "attention_mask", "position_ids", *self.empty}
        unknown = [i.name for i in session.get_inputs() if i.name not in known]
        if unknown or not self.empty:
            raise CpOnnxError(f"the graph is not a text-generation-with-past graph (inputs {', '.join(unknown) or 'without past_key_values'}); re-export with --with-past")
        self.inputs = {i.name for i in session.get_inputs()}
        self.outputs = [o.name for o in session.get_outputs()]
        self.past, self.length = self.empty, 0  # the cache and how many tokens it holds

    def start(self, ids: list[int]) -> np.ndarray:
        self.past, self.length = self.empty, 0  # a new sequence: one decoder (one session) serves many prompts
        return self._run(ids)

    def step(self, token: int) -> np.ndarray:
        return self._run([token])

    def _run(self, ids: list[int]) -> np.ndarray:
        total = self.length + len(ids)
        feeds = {"input_ids": np.array([ids], dtype=np.int64), "attention_mask": np.ones((1, total), dtype=np.int64), **self.past}
        if "position_ids" in self.inputs:
            feeds["position_ids"] = np.arange(self.length, total, dtype=np.int64)[None]
        values = dict(zip(self.outputs, run_session(self.session, self.outputs, feeds)))
        self.past = {name: values[name.replace("past_key_values.", "present.", 1)] for name in self.past}
        self.length = total
        return values["logits"][0, -1]


def with_past_graph(model: ModelFolder) -> Path | None:
    """The folder's KV-cache graph, if it has one."""
    relative = (model.manifest.get("onnx") or {}).get("with_past")
    path = model.path / relative if relative else None
    return path if path is not None and path.is_file() else None


def takes_cache(onnx_path: Path) -> bool:
    """Whether the graph has KV-cache inputs (an onnxruntime-genai build is one graph, with its cache)."""
    return any(PAST.match(value.name) for value in graph_io.load(onnx_path, weights=False).graph.input)


def eos_token_ids(model: ModelFolder) -> set[int]:
    """End-of-sequence ids: the manifest's, else generation_config.json's, config.json's, else tokenizer_config.json's token."""
    found = model.manifest.get("eos_token_id")
    for name in _EOS_FILES:
        if found is None:
            found = _read_json(model.path / name).get("eos_token_id")
    if found is None:
        token = _read_json(model.path / "tokenizer_config.json").get("eos_token")
        token = token.get("content") if isinstance(token, dict) else token
        found = model.tokenizer.token_to_id(token) if isinstance(token, str) else None
    found = found if isinstance(found, list) else [found]
    return {i for i in found if isinstance(i, int) and not isinstance(i, bool) and i >= 0}  # a damaged file's others are no token


def _read_json(path: Path) -> dict:
    try:
        data = shapes.read_json(path, "model config", "")
    except (CpOnnxError, OSError):
        return {}  # absent, unreadable or hostile: the next source is tried
    return data if isinstance(data, dict) else {}
