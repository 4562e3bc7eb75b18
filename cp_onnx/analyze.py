"""`cp-onnx analyze` as one library call: ``analyze(model, settings)`` runs everything the command offers and
returns the report (report.json's dictionary); ``save`` writes it and the circuit graph. The command line and
``cp-onnx batch`` only parse, call these two, and print.

Stages, in order, each on the calibration texts loaded once:
1. the paper's per-layer statistics (one pass) and its block scores (stability, anomaly, composite, boundary;
   contrastive on request);
2. the default prediction (``predict.METHOD``) for each prompting regime: the blocks raced by the loss of the
   model with each one duplicated, and a decision per regime;
3. on request: the Jacobian and Mahalanobis scores and head influence (the circuit graph), the pruning
   candidates, and the top blocks per language.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from cp_onnx import calibration
from cp_onnx.analysis import predict, report, scores
from cp_onnx.analysis.bootstrap import RESAMPLES
from cp_onnx.analysis.activations import ActivationReader
from cp_onnx.analysis.stats import LayerStatistics
from cp_onnx.errors import CpOnnxError
from cp_onnx.files import write_json
from cp_onnx.models import budget
from cp_onnx.models.evaluators import candidate_blocks
from cp_onnx.models.model import ModelFolder
from cp_onnx.regimes import FEW_SHOT, REGIMES, ZERO_SHOT

# The paper's two kinds of circuit and the method that predicts each.
KINDS = {"stability": "stability", "magnitude": "anomaly"}
SINGLE_SET_METHODS = ("stability", "anomaly", "composite", "boundary")
DEFAULT_METHODS = (predict.METHOD, *SINGLE_SET_METHODS)
METHODS = (*DEFAULT_METHODS, "contrastive")  # what --method accepts
AUTO = "auto"  # exact_heads: heads.EXACT_HEADS, or every head with prune (its default head method ranks them by exact ablation)

Progress = Callable[[int, int], None]


def no_progress(label: str) -> Progress | None:
    return None


@dataclass(frozen=True)
class Settings:
    """Every option of an analysis: the command line's flags and a batch manifest's keys map onto these."""

    calibration: str | None = None  # shipped set name or a user file; None = shipped reasoning texts
    n: int | None = 10
    max_length: int = 128
    language: str = "en"
    methods: tuple[str, ...] = DEFAULT_METHODS
    block_sizes: tuple[int, ...] = (3, 4, 5)
    batch_size: int = 8
    threads: int | None = None
    screen: bool = True  # False: the default method's exhaustive computation (every block on every unit, no race)
    regimes: tuple[str, ...] = REGIMES  # the prompting regimes the default method decides for
    jacobian: bool = False  # Jacobian stability and Mahalanobis anomaly, and the circuit graph
    heads: bool = False  # head influence (implies the circuit graph)
    exact_heads: int | str | None = AUTO  # heads ablated exactly: a number, None for every head, AUTO
    prune: bool = False  # the pruning candidates of every layer method (and heads, with ``heads``)
    languages: tuple[str, ...] = ()  # the top blocks per language besides ``language``

    def identity_settings(self) -> dict:
        """The settings that change the numbers (not batch size or threads: results do not depend on them)."""
        return {"max_length": self.max_length, "block_sizes": list(self.block_sizes), "language": self.language, "screen": self.screen,
                "regimes": list(self.regimes)}

    @property
    def circuit(self) -> bool:
        return self.jacobian or self.heads

    @property
    def exact_head_count(self) -> int | None:
        from cp_onnx.analysis.heads import EXACT_HEADS

        if self.exact_heads == AUTO:
            return None if self.prune else EXACT_HEADS
        return self.exact_heads


def exact_heads_option(text: str | None) -> int | str | None:
    """--exact-heads N|all (a manifest's exact_heads) as Settings takes it: a count, None (every head), AUTO when not given."""
    if text is None:
        return AUTO
    if text.strip().lower() == "all":
        return None
    try:
        count = int(text)
    except ValueError:
        count = -1
    if count < 0:
        raise CpOnnxError(f"--exact-heads takes a number of heads (0 or more) or 'all', not {text!r}")
    return count


def check_settings(settings: Settings) -> None:
    """The counts a user types, each a positive integer (argparse takes 0 and negatives as integers too), and the names."""
    for name in ("max_length", "batch_size", "threads"):
        value = getattr(settings, name)
        if value is None and name == "threads":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise CpOnnxError(f"--{name.replace('_', '-')} must be a positive integer, not {value!r}")
    unknown = [m for m in settings.methods if m not in METHODS]
    if unknown or not settings.methods:
        raise CpOnnxError(f"unknown methods {unknown or '[]'}; choose from {', '.join(METHODS)}")
    if not settings.regimes or any(r not in REGIMES for r in settings.regimes):
        raise CpOnnxError(f"unknown prompting regimes {list(settings.regimes)}; use zero, few or both")
    count = settings.exact_heads
    if count not in (AUTO, None) and (isinstance(count, bool) or not isinstance(count, int) or count < 0):
        raise CpOnnxError(f"--exact-heads takes a number of heads (0 or more) or 'all', not {count!r}")
    if count != AUTO and not settings.heads:
        raise CpOnnxError("--exact-heads applies to head influence: add --heads")


@dataclass
class Texts:
    """The calibration inputs of one analysis, loaded once: reasoning texts, their kinds and tokens, the general
    texts, and the zero-shot questions."""

    reasoning: list[str]
    kinds: list[str]
    token_lists: list[list[int]]
    general: list[str]
    questions: list[tuple[str, str, str]] = field(default_factory=list)


def load_texts(model: ModelFolder, settings: Settings, log: Callable[[str], None]) -> Texts:
    """The calibration inputs. Texts that state no answer leave the zero-shot prediction out, with a note, unless it is
    the only regime asked for (then the error says what to give)."""
    texts = calibration.load_calibration(settings.calibration, n=settings.n, language=settings.language)
    token_lists = _encode(model, texts, settings, log)
    questions = []
    if predict.METHOD in settings.methods and ZERO_SHOT in settings.regimes:
        try:
            questions = calibration.load_questions(settings.calibration, language=settings.language)
        except CpOnnxError as exc:
            if settings.regimes == (ZERO_SHOT,):  # asked for alone: say what to give
                raise
            log(f"note: the zero-shot prediction is skipped: {exc}")
    return Texts(texts, calibration.load_kinds(settings.calibration, n=settings.n, language=settings.language), token_lists,
                 calibration.load_calibration("general", n=settings.n), questions)


def collect_statistics(reader: ActivationReader, token_lists: Sequence[Sequence[int]], *, batch_size: int = 8, progress: Progress | None = None) -> dict[str, np.ndarray]:
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


def _encode(model: ModelFolder, texts: list[str], settings: Settings, log: Callable[[str], None]) -> list[list[int]]:
    if not texts:
        raise CpOnnxError("no calibration texts; give a file with at least one non-empty line")
    token_lists, truncated = model.encode(texts, max_length=settings.max_length)
    if truncated:
        log(f"note: {truncated} of {len(texts)} calibration texts were longer than {settings.max_length} tokens and were truncated (--max-length)")
    return token_lists


def analyze(model: ModelFolder, settings: Settings, *, log: Callable[[str], None] = print,
            progress: Callable[[str], Progress | None] = no_progress) -> dict:
    """Run every stage ``settings`` asks for on one model and return its report (``progress(label)``: a callback per stage)."""
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    check_settings(settings)
    if settings.heads:
        from cp_onnx.analysis.circuit import check_heads

        check_heads(model)  # before any work: a graph with fused attention has no heads to analyse
    texts = load_texts(model, settings, log)
    reader = ActivationReader(model, threads=settings.threads)
    candidate_blocks(reader.num_layers, settings.block_sizes)  # fails early on too few layers
    shape = budget.model_shape(model, reader.layer_map)
    budget.check_batches(shape, texts.token_lists, settings.batch_size, patterns=reader.with_patterns)
    if predict.METHOD in settings.methods:  # its batches from the real token counts; a zero-shot question is never cut
        budget.check_prediction(model, shape, texts.token_lists, texts.questions, settings.max_length, texts.general, RESAMPLES,
                                few_shot=FEW_SHOT in settings.regimes)
    timings["load_and_rewrite_s"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    stats = collect_statistics(reader, texts.token_lists, batch_size=settings.batch_size, progress=progress("calibration texts"))
    timings["statistics_s"] = time.perf_counter() - t1
    timings["statistics_layer_tokens"] = reader.layer_tokens
    num_layers, family = reader.num_layers, reader.layer_map.family

    methods: dict[str, list[scores.Block]] = {}
    predictions: dict[str, predict.Prediction] = {}
    # The statistics' methods first, then the default method without the full-model session: its own
    # layer sessions share the weights, but a quantized graph's prepacked copies are per session.
    for method in sorted(settings.methods, key=lambda m: m == predict.METHOD):
        began = time.perf_counter()
        if method == predict.METHOD:
            del reader
            predictions = _predict(model, settings, texts, log, progress("duplicated blocks, % of the planned work"))
            if not predictions:
                continue
            methods[method] = next(iter(predictions.values())).blocks  # the first regime's ranking (REGIMES order); each is in "predictions"
            for regime, found in predictions.items():
                timings[f"{method}_{regime}_layer_tokens"] = found.layer_tokens
        elif method == "contrastive":
            methods[method] = _contrastive(model, reader, settings, log)
        else:
            methods[method] = scores.rank_blocks(stats, method, settings.block_sizes)
        timings[f"{method}_s"] = time.perf_counter() - began
    methods = {m: methods[m] for m in settings.methods if m in methods}  # the order asked for

    identity = calibration.calibration_identity(texts.reasoning, settings.identity_settings())
    calib = {"source": settings.calibration or "reasoning", "language": settings.language, "n": len(texts.reasoning),
             "max_length": settings.max_length, "tokens": int(sum(len(t) for t in texts.token_lists)), "identity": identity}
    if texts.questions:
        calib["questions"] = len(texts.questions)
    data = report.build_report(model, num_layers, family, stats, methods, calib, timings, predictions)
    if settings.languages:
        began = time.perf_counter()
        data["languages"] = language_check(model, settings, settings.languages, log=log)
        timings["languages_s"] = time.perf_counter() - began
    if settings.circuit:
        from cp_onnx.analysis.circuit import circuit_analysis

        sections = circuit_analysis(model, texts.reasoning, max_length=settings.max_length, with_heads=settings.heads,
                                    exact_heads=settings.exact_head_count, block_sizes=settings.block_sizes, threads=settings.threads,
                                    progress=progress("circuit analysis"))
        data["methods"].update(sections.pop("methods"))
        timings.update(sections.pop("timings"))
        data.update(sections)
    if settings.prune:
        from cp_onnx.analysis.prune import pruning_section

        began = time.perf_counter()
        data["pruning"] = pruning_section(model, texts.reasoning, texts.general, data, max_length=settings.max_length,
                                          threads=settings.threads, progress=progress("removals"))
        timings["pruning_s"] = time.perf_counter() - began
    timings["total_s"] = time.perf_counter() - t0
    data["timings"] = report.json_ready(timings)
    return data


def save(data: dict, folder: str | Path) -> list[Path]:
    """Write report.json into ``folder``, and the circuit graph (GraphML, node-link JSON, DOT) when the report has one."""
    folder = Path(folder)
    written = [write_json(data, folder / "report.json")]
    if "jacobian" in data or "heads" in data:
        from cp_onnx.analysis.circuit import build_circuit_graph, write_circuit

        written += list(write_circuit(build_circuit_graph(data), folder).values())
    return written


def _predict(model: ModelFolder, settings: Settings, texts: Texts, log, progress) -> dict[str, predict.Prediction]:
    """The default method's predictions per regime that can be made; {} when none can and other methods run."""
    regimes = tuple(r for r in settings.regimes if r != ZERO_SHOT or texts.questions)
    if not regimes:
        return {}
    try:
        return predict.predict(model, texts.reasoning, texts.general, regimes=regimes, questions=texts.questions, kinds=texts.kinds,
                               block_sizes=settings.block_sizes, max_length=settings.max_length, threads=settings.threads, progress=progress,
                               screen=settings.screen, log=log)
    except predict.NoNumbersError as exc:
        if settings.methods == (predict.METHOD,):
            raise
        log(f"note: {predict.METHOD} skipped: {exc}")
        return {}


def _contrastive(model: ModelFolder, reader: ActivationReader, settings: Settings, log) -> list[scores.Block]:
    """Statistics on reasoning and on general texts separately, and on both together."""
    reasoning = _encode(model, calibration.load_calibration("reasoning", n=settings.n, language=settings.language), settings, log)
    general = _encode(model, calibration.load_calibration("general", n=settings.n), settings, log)
    per_set = [collect_statistics(reader, ids, batch_size=settings.batch_size) for ids in (reasoning, general, reasoning + general)]
    return scores.rank_blocks(per_set[2], "contrastive", settings.block_sizes, contrast_stats=(per_set[0], per_set[1]))


def language_check(model: ModelFolder, settings: Settings, languages: Sequence[str], *, top: int = 3, log: Callable[[str], None] = print) -> dict:
    """Top blocks per language for each method, and how far the top-1 blocks spread across languages.

    The default method runs few-shot here: only the English texts state answers to ask zero-shot."""
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
            found = predict.predict(model, texts, general, regimes=("few_shot",), block_sizes=settings.block_sizes,
                                    max_length=settings.max_length, threads=settings.threads, screen=settings.screen)
            per_language[language][predict.METHOD] = [b.as_dict() for b in found["few_shot"].blocks[:top]]
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
