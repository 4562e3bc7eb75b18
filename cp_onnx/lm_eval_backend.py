"""The ``cp-onnx`` model of EleutherAI's lm-evaluation-harness (``pip install lm-eval``): log-likelihoods, rolling
log-likelihoods and greedy generation from any model folder cp-onnx opens (exported, quantized, applied, or an
onnxruntime-genai build), run as it is or along a layer path (``duplicate=I:J``, ``path=0..14,12..14,15..29`` or ``path=merge.yml``, a mergekit
passthrough config).

lm-eval 0.4 looks models up only in its own table and among classes already registered in the process (it has no
plugin entry point), so this module registers the model on import and ``cp-onnx lm-eval ARGS`` runs lm-eval's own
command line after importing it. Nothing else in cp_onnx imports this module: cp-onnx never needs lm-eval.
"""
from __future__ import annotations

import sys
from typing import Sequence

import numpy as np
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

import graph_passes
from cp_onnx import shapes
from cp_onnx.errors import CpOnnxError
from cp_onnx.groundtruth import lm_eval_task
from cp_onnx.models.scoring import token_scores
from cp_onnx.models.generate import CachedDecoder, FullDecoder, eos_token_ids, greedy, takes_cache, with_past_graph
from cp_onnx.models.model import open_model
from cp_onnx.models.runner import Runner, open_graph, pad_batch
from cp_onnx.outputs import mergekit
from graph_passes.last_position import last_position
from graph_passes.layer_path import format_path

NAME = "cp-onnx"
DEFAULT_BATCH = 8  # rows per batch for batch_size=auto: the logits budget below bounds memory anyway
DEFAULT_MAX_LENGTH = 2048  # context length when neither model_args nor the folder's config.json gives one
MAX_CONTEXT = 1 << 20  # a config.json naming a longer context is damaged: the default is used instead
LOGITS_BYTES = 256 * 2**20  # a batch's float32 logits stay under this (a 150k vocabulary costs 0.6 MB per token)
MAX_GEN_TOKS = 256  # lm-eval's usual default when a task sets no max_gen_toks
ARGS = ("model", "duplicate", "path", "batch_size", "max_length", "threads", "max_batch_size", "device")


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@register_model(NAME)
class CpOnnxLM(TemplateLM):
    """model_args: ``model`` (folder, .onnx file, or anything ``cp-onnx export`` accepts; default smollm2), at most one
    of ``duplicate=I:J`` and ``path=LAYERS``, ``batch_size``, ``max_length`` (tokens of context), ``threads``."""

    def __init__(self, model=None, duplicate=None, path=None, batch_size=1, max_length=None, threads=None, **others):
        super().__init__()
        unknown = sorted(set(others) - set(ARGS))
        if unknown:
            raise CpOnnxError(f"unknown cp-onnx model_args {', '.join(unknown)}; use {', '.join(ARGS[:6])}")
        if others.get("device") not in (None, "cpu"):
            _stderr(f"cp-onnx runs on the CPU with onnxruntime; device {others['device']} is ignored")
        if duplicate is not None and path is not None:
            raise CpOnnxError("give at most one of duplicate=I:J and path=LAYERS in model_args")
        self.folder = open_model(None if model is None else str(model), log=_stderr)
        self.spec = duplicate if duplicate is not None else path
        self.threads = None if threads is None else _whole("threads", threads)
        self.batch_rows = DEFAULT_BATCH if str(batch_size).startswith("auto") else _whole("batch_size", batch_size)
        self._max_length = _whole("max_length", max_length) if max_length else _context_length(self.folder.path)
        self.runner, self.layers = self._runner(self.folder.onnx_path)
        self.logits = "logits" if "logits" in self.runner.output_names else self.runner.output_names[0]
        self.vocab = _vocab_size(self.runner, self.logits, self.folder)
        self.eos = eos_token_ids(self.folder)
        self.bos = _bos_token(self.folder.tokenizer)
        self.max_gen_toks = MAX_GEN_TOKS
        self._decoder: FullDecoder | CachedDecoder | None = None

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> "CpOnnxLM":
        """As lm-eval's, except that a layer path keeps its own commas: ``model=DIR,path=0..14,12,13,14,15..29``."""
        args = dict(part.partition("=")[::2] for part in join_layer_path(arg_string))
        return cls(**args, **{k: v for k, v in (additional_config or {}).items() if v is not None})

    def _runner(self, graph_path, *, last_only: bool = False) -> tuple[Runner, list[int] | None]:
        """A Runner over the graph at ``graph_path``, routed along the layer path if one was given; ``last_only``
        computes the last position's logits only, all that generation reads (``last_position``)."""
        proto, weights = open_graph(graph_path)
        layers = None
        if self.spec is not None:
            try:
                layer_map = graph_passes.discover(proto)
                count = layer_map.num_layers
                edit = mergekit.read_edit(self.spec, count)
                if edit.removed_heads:
                    raise CpOnnxError(f"{edit} removes heads; evaluate a model pruned by `cp-onnx prune` instead")
                layers = edit.path(count)
                proto = graph_passes.route(proto, layer_map, layers)
            except graph_passes.GraphPassError as exc:
                raise CpOnnxError(str(exc)) from exc
        if last_only:
            proto = last_position(proto) or proto
        return Runner(proto, threads=self.threads, weights=weights), layers

    # lm-eval's interface --------------------------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        if not self.eos:
            raise CpOnnxError(f"{self.folder.path} names no end-of-sequence token (manifest, generation_config.json, config.json); re-export the model")
        return min(self.eos)

    @property
    def prefix_token_id(self) -> int:
        """What an empty context is conditioned on: BOS where the tokenizer adds one (as cp-onnx's scoring does)."""
        return self.bos if self.bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return f"{self.folder.name}|{self.layer_path or 'original'}"

    @property
    def layer_path(self) -> str | None:
        return None if self.layers is None else format_path(self.layers)

    def get_model_info(self) -> dict:
        """Recorded in lm-eval's results: which model and which layer path were evaluated."""
        return {"cp_onnx_model": str(self.folder.path), "cp_onnx_layer_path": self.layer_path or self.folder.manifest.get("layer_path")}

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """Token ids with BOS as the exported tokenizer adds it, unless the text already starts with it."""
        if add_special_tokens is None:
            add_special_tokens = not (self.bos is not None and string.startswith(self.folder.tokenizer.id_to_token(self.bos)))
        return self.folder.tokenizer.encode(string, add_special_tokens=add_special_tokens).ids

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.folder.tokenizer.decode(list(tokens), skip_special_tokens=True)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(sum of log-probs, all greedy) of each continuation after its context, longest first in batches whose
        logits fit LOGITS_BYTES; a context longer than max_length loses its oldest tokens."""
        rows = []
        for _, context, continuation in requests:
            whole = (list(context) + list(continuation))[-(self._max_length + 1):]
            scored = min(len(continuation), len(whole) - 1)
            if scored < 1:
                raise CpOnnxError("lm-eval asked for the log-likelihood of an empty continuation; check the task's doc_to_target")
            rows.append((whole[:-1], whole[-scored:]))
        results: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
        order = sorted(range(len(rows)), key=lambda k: -len(rows[k][0]))
        start = 0
        while start < len(order):
            width = len(rows[order[start]][0])
            chunk = order[start : start + max(1, min(self.batch_rows, LOGITS_BYTES // (4 * width * self.vocab)))]
            ids, mask = pad_batch([rows[k][0] for k in chunk])
            logits = self.runner.run(ids, mask, [self.logits])[self.logits]
            for row, k in enumerate(chunk):
                inputs, targets = rows[k]
                logprob, hit = token_scores(logits[row, len(inputs) - len(targets) : len(inputs)], np.asarray(targets))
                results[k] = (float(logprob.sum()), bool(hit.all()))
                if requests[k][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[k][0], results[k])
            start += len(chunk)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each text's log-probability given the prefix token, in windows of max_length tokens (lm-eval's rolling scheme)."""
        windows, owners = [], []
        for k, (text,) in enumerate(req.args for req in requests):
            tokens = self.tok_encode(text, add_special_tokens=False)
            for context, target in map(make_disjoint_window, get_rolling_token_windows(tokens, self.prefix_token_id, self._max_length, 1)):
                windows.append((None, context, target))
                owners.append(k)
        totals = [0.0] * len(requests)
        for k, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm)):
            totals[k] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations, cut at the first of the request's stop strings; the KV-cache graph when the folder has one."""
        outputs = []
        for req in requests:
            context, gen_kwargs = req.args
            settings = dict(gen_kwargs or {})
            if settings.get("do_sample"):
                raise CpOnnxError("cp-onnx decodes greedily but the task asks for sampling; pass --gen_kwargs do_sample=false")
            until = settings.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            new_tokens = int(settings.get("max_gen_toks", self.max_gen_toks))
            room = self._max_length - new_tokens
            if room < 1:
                raise CpOnnxError(f"max_gen_toks {new_tokens} leaves no room for the prompt in max_length {self._max_length}; raise max_length in model_args")
            stop = (lambda new: any(s in self.tok_decode(new) for s in until)) if until else None
            text = self.tok_decode(greedy(self._generation_decoder(), self.tok_encode(context)[-room:], new_tokens, self.eos, stop))
            for s in until:
                text = text.split(s)[0]
            outputs.append(text)
            self.cache_hook.add_partial("generate_until", req.args, text)
        return outputs

    def _generation_decoder(self) -> FullDecoder | CachedDecoder:
        """Made on first use: scoring-only evaluations never open the KV-cache graph."""
        if self._decoder is None:
            onnx_path = self.folder.onnx_path
            cached = with_past_graph(self.folder) or (onnx_path if takes_cache(onnx_path) else None)
            if cached is None:
                self._decoder = FullDecoder(self.runner)
            else:
                self._decoder = CachedDecoder(self.runner if cached == onnx_path else self._runner(cached, last_only=True)[0], self.folder.manifest)
        return self._decoder


def join_layer_path(arg_string: str) -> list[str]:
    """``key=value`` entries of a model_args string, a comma-separated entry without ``=`` (a layer path's next part)
    joined back onto the entry before it."""
    parts: list[str] = []
    for part in arg_string.split(","):
        if "=" in part or not parts:
            parts.append(part)
        else:
            parts[-1] += "," + part
    return [p for p in parts if p.strip()]


def quote_layer_paths(argv: Sequence[str]) -> list[str]:
    """lm-eval's command line splits --model_args at every comma outside quotes: quote values that hold commas, so
    ``--model_args model=DIR,path=0..14,12,13,14,15..29`` reaches the model whole."""
    out, in_args = [], False
    for token in argv:
        if in_args and not token.startswith("-") and not token.lstrip().startswith("{"):  # "{": lm-eval's JSON form
            token = ",".join(_quoted(part) for part in join_layer_path(token))
        else:
            in_args = token in ("--model_args", "-a")
        out.append(token)
    return out


def _quoted(entry: str) -> str:
    key, _, value = entry.partition("=")
    return f'{key}="{value}"' if "," in value and value[:1] not in "\"'" else entry


def run_cli(argv: Sequence[str]) -> int:
    """lm-eval's own command line (``lm-eval run ...`` or its legacy form) with the cp-onnx model registered."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm-eval", *with_shipped_task(quote_layer_paths(argv))]
    cli_evaluate()
    return 0


def with_shipped_task(argv: Sequence[str]) -> list[str]:
    """``argv`` with ``--include_path`` to cp-onnx's shipped task (written into the cache) when ``--tasks`` names it and
    no include path is given: ``cp-onnx lm-eval --model cp-onnx --model_args model=DIR --tasks cp_onnx_probes`` just runs."""
    argv = list(argv)
    tasks = [value for flag, value in zip(argv, argv[1:]) if flag in ("--tasks", "-t")]
    tasks += [arg.partition("=")[2] for arg in argv if arg.startswith("--tasks=")]
    named = any(lm_eval_task.TASK in value.split(",") for value in tasks)
    if not named or any(arg == "--include_path" or arg.startswith("--include_path=") for arg in argv):
        return argv
    from exporters.pipeline import cache_root  # torch-free: where cp-onnx keeps what it generates

    folder = lm_eval_task.write_task(cache_root(None) / "lm_eval_tasks" / f"seed{lm_eval_task.SEED}")
    return [*argv, "--include_path", str(folder)]


def _whole(name: str, value) -> int:
    """A model_args number (lm-eval hands them over as strings or ints), checked to be a whole number >= 1."""
    text = str(value).strip()
    if not text.isdigit() or int(text) < 1:
        raise CpOnnxError(f"{name} must be a whole number >= 1{' or auto' if name == 'batch_size' else ''}, not {value!r}")
    return int(text)


def _context_length(folder) -> int:
    """max_position_embeddings (n_positions for GPT-2) from the folder's config.json, else DEFAULT_MAX_LENGTH."""
    try:
        config = shapes.read_json(folder / "config.json", "model config", "")
    except (CpOnnxError, OSError):
        return DEFAULT_MAX_LENGTH  # a bare .onnx file or a deployed build without a config
    found = config.get("max_position_embeddings") or config.get("n_positions") if isinstance(config, dict) else None
    return found if isinstance(found, int) and not isinstance(found, bool) and 0 < found <= MAX_CONTEXT else DEFAULT_MAX_LENGTH


def _vocab_size(runner: Runner, logits: str, folder) -> int:
    """The logits' last dimension as the graph declares it, else the manifest's or the tokenizer's vocabulary."""
    shape = next(o.shape for o in runner.session.get_outputs() if o.name == logits)
    declared = shape[-1] if shape and isinstance(shape[-1], int) else None
    return declared or folder.manifest.get("vocab_size") or folder.tokenizer.get_vocab_size()


def _bos_token(tokenizer) -> int | None:
    """The token the tokenizer puts before every text, if it adds one."""
    plain, full = tokenizer.encode("a", add_special_tokens=False).ids, tokenizer.encode("a").ids
    return full[0] if len(full) == len(plain) + 1 and full[1:] == plain else None
