"""`cp-onnx analyze`: the paper's statistics over calibration texts, its ranked blocks, and the default
prediction (``predict.METHOD``: the loss of the model with each block duplicated, and a decision)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from cp_onnx import calibration
from cp_onnx.analysis import budget, predict, scores
from cp_onnx.analysis.activations import ActivationReader
from cp_onnx.analysis.stats import LayerStatistics
from cp_onnx.errors import CpOnnxError
from cp_onnx.models.model import ModelFolder

# The paper's two kinds of circuit and the method that predicts each.
KINDS = {"stability": "stability", "magnitude": "anomaly"}
SINGLE_SET_METHODS = ("stability", "anomaly", "composite", "boundary")
DEFAULT_METHODS = (predict.METHOD, *SINGLE_SET_METHODS)


@dataclass
class Settings:
    calibration: str | None = None  # shipped set name or a user file; None = shipped reasoning texts
    n: int | None = 10
    max_length: int = 128
    language: str = "en"
    methods: tuple[str, ...] = DEFAULT_METHODS
    block_sizes: tuple[int, ...] = (3, 4, 5)
    batch_size: int = 8
    threads: int | None = None
    screen: bool = True  # the default method scores the middle size first, then its leaders' neighbours (predict.SCREEN_TOP)
    regime: str = predict.FEW_SHOT  # the prompting the default prediction is for (predict.REGIMES)

    def identity_settings(self) -> dict:
        """The settings that change the numbers (not batch size or threads: results do not depend on them)."""
        return {"max_length": self.max_length, "block_sizes": list(self.block_sizes), "language": self.language, "screen": self.screen,
                "regime": self.regime}


@dataclass
class Analysis:
    model: ModelFolder
    num_layers: int
    family: str
    stats: dict[str, np.ndarray]
    methods: dict[str, list[scores.Block]]
    calibration: dict
    timings: dict[str, float] = field(default_factory=dict)
    languages: dict | None = None
    prediction: predict.Prediction | None = None


def collect_statistics(reader: ActivationReader, token_lists: Sequence[Sequence[int]], *, batch_size: int = 8, progress: Callable[[int, int], None] | None = None) -> dict[str, np.ndarray]:
    """Stream the texts through the model and return the seven per-layer statistics.

    Texts run longest first, so that a batch holds texts of similar lengths and pads little; the
    statistics still see them in the given order (``positions``).
    """
    accumulator = LayerStatistics(reader.num_layers)
    order = sorted(range(len(token_lists)), key=lambda i: -len(token_lists[i]))
    done = 0
    for batch in reader.batches([token_lists[i] for i in order], batch_size=batch_size, progress=progress):
        count = len(batch.attention_mask)
        accumulator.add_batch(batch.resid_in, batch.resid_out, batch.attention_mask, batch.patterns, positions=order[done : done + count])
        done += count
    return accumulator.result()


def check_settings(settings: Settings) -> None:
    """The counts a user types, each a positive integer (argparse takes 0 and negatives as integers too)."""
    for name in ("max_length", "batch_size", "threads"):
        value = getattr(settings, name)
        if value is None and name == "threads":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise CpOnnxError(f"--{name.replace('_', '-')} must be a positive integer, not {value!r}")
    if settings.regime not in predict.REGIMES:
        raise CpOnnxError(f"unknown prompting regime {settings.regime!r}; use {' or '.join(predict.REGIMES)}")


def _encode(model: ModelFolder, texts: list[str], settings: Settings, log: Callable[[str], None]) -> list[list[int]]:
    if not texts:
        raise CpOnnxError("no calibration texts; give a file with at least one non-empty line")
    token_lists, truncated = model.encode(texts, max_length=settings.max_length)
    if truncated:
        log(f"note: {truncated} of {len(texts)} calibration texts were longer than {settings.max_length} tokens and were truncated (--max-length)")
    return token_lists


def analyze(model: ModelFolder, settings: Settings, *, log: Callable[[str], None] = print, progress: Callable[[int, int], None] | None = None,
            block_progress: Callable[[int, int], None] | None = None) -> Analysis:
    """Run the paper's statistics and every requested method on one model (``block_progress``: the default method's blocks)."""
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    check_settings(settings)
    texts = calibration.load_calibration(settings.calibration, n=settings.n, language=settings.language)
    token_lists = _encode(model, texts, settings, log)
    zero_shot = settings.regime == predict.ZERO_SHOT and predict.METHOD in settings.methods
    questions = calibration.load_questions(settings.calibration, language=settings.language) if zero_shot else ()  # fails before any work
    reader = ActivationReader(model, threads=settings.threads)
    scores.candidate_blocks(reader.num_layers, settings.block_sizes)  # fails early on too few layers
    shape = budget.model_shape(model, reader.layer_map)
    budget.check_batches(shape, token_lists, settings.batch_size, patterns=reader.with_patterns)
    if predict.METHOD in settings.methods:  # its batches from the real token counts; a zero-shot question is never cut
        budget.check_prediction(model, shape, token_lists, questions, settings.max_length, calibration.load_calibration("general", n=settings.n))
    timings["load_and_rewrite_s"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    stats = collect_statistics(reader, token_lists, batch_size=settings.batch_size, progress=progress)
    timings["statistics_s"] = time.perf_counter() - t1
    timings["statistics_layer_tokens"] = reader.layer_tokens

    methods: dict[str, list[scores.Block]] = {}
    prediction = None
    num_layers, family = reader.num_layers, reader.layer_map.family
    # The statistics' methods first, then the default method without the full-model session: its own
    # layer sessions share the weights, but a quantized graph's prepacked copies are per session.
    for method in sorted(settings.methods, key=lambda m: m == predict.METHOD):
        began = time.perf_counter()
        if method == predict.METHOD:
            del reader
            general = calibration.load_calibration("general", n=settings.n)
            kinds = calibration.load_kinds(settings.calibration, n=settings.n, language=settings.language)
            try:
                prediction = predict.predict(model, texts, general, block_sizes=settings.block_sizes, max_length=settings.max_length,
                                             threads=settings.threads, progress=block_progress, screen=settings.screen, kinds=kinds,
                                             regime=settings.regime, questions=questions)
            except predict.NoNumbersError as exc:
                if len(settings.methods) == 1:
                    raise
                log(f"note: {method} skipped: {exc}")
                continue
            methods[method] = prediction.blocks
            timings[f"{method}_layer_tokens"] = prediction.layer_tokens
        elif method == "contrastive":
            methods[method] = _contrastive(model, reader, settings, log)
        else:
            methods[method] = scores.rank_blocks(stats, method, settings.block_sizes)
        timings[f"{method}_s"] = time.perf_counter() - began
    methods = {m: methods[m] for m in settings.methods if m in methods}  # the order asked for
    timings["total_s"] = time.perf_counter() - t0

    identity = calibration.calibration_identity(texts, settings.identity_settings())
    calib = {
        "source": settings.calibration or "reasoning",
        "language": settings.language,
        "n": len(texts),
        "max_length": settings.max_length,
        "tokens": int(sum(len(t) for t in token_lists)),
        "identity": identity,
    }
    return Analysis(model, num_layers, family, stats, methods, calib, timings, prediction=prediction)


def _contrastive(model: ModelFolder, reader: ActivationReader, settings: Settings, log) -> list[scores.Block]:
    """Statistics on reasoning and on general texts separately, and on both together."""
    reasoning = _encode(model, calibration.load_calibration("reasoning", n=settings.n, language=settings.language), settings, log)
    general = _encode(model, calibration.load_calibration("general", n=settings.n), settings, log)
    per_set = [collect_statistics(reader, ids, batch_size=settings.batch_size) for ids in (reasoning, general, reasoning + general)]
    return scores.rank_blocks(per_set[2], "contrastive", settings.block_sizes, contrast_stats=(per_set[0], per_set[1]))


def language_check(model: ModelFolder, settings: Settings, languages: Sequence[str], *, top: int = 3, log: Callable[[str], None] = print) -> dict:
    """Top blocks per language for each method, and how far the top-1 blocks spread across languages."""
    per_language: dict[str, dict[str, list[dict]]] = {}
    reader = ActivationReader(model, threads=settings.threads)
    general = calibration.load_calibration("general", n=settings.n) if predict.METHOD in settings.methods else []
    for language in languages:
        texts = calibration.load_calibration("reasoning", n=settings.n, language=language)
        stats = collect_statistics(reader, _encode(model, texts, settings, log), batch_size=settings.batch_size)
        per_language[language] = {
            m: [b.as_dict() for b in scores.rank_blocks(stats, m, settings.block_sizes)[:top]] for m in settings.methods if m in SINGLE_SET_METHODS
        }
        if general:  # the cost side stays the English general texts: only the reasoning language changes
            prediction = predict.predict(model, texts, general, block_sizes=settings.block_sizes, max_length=settings.max_length,
                                         threads=settings.threads, screen=settings.screen)
            per_language[language][predict.METHOD] = [b.as_dict() for b in prediction.blocks[:top]]
    spread = {}
    for method in next(iter(per_language.values())):
        tops = [(blocks[0]["start"], blocks[0]["end"]) for blocks in (per_language[lang][method] for lang in languages)]
        starts, ends = np.array([t[0] for t in tops]), np.array([t[1] for t in tops])
        spread[method] = {
            "top1": {lang: list(t) for lang, t in zip(languages, tops)},
            "start_range": int(starts.max() - starts.min()),
            "end_range": int(ends.max() - ends.min()),
            "all_agree": len(set(tops)) == 1,
        }
    return {"languages": list(languages), "top": per_language, "spread": spread}
