"""Memory an analysis, a prediction or a sweep will need, checked before the first batch runs.

The statistics of ``cp-onnx analyze`` hold one batch's exposed activations: the residual stream
after every layer ([batch, seq, hidden] each), the attention patterns ([batch, heads, seq, seq] per
layer: quadratic in the text length) and the logits ([batch, seq, vocab]). A long enough text makes
that terabytes, which onnxruntime would try to allocate (and the out-of-memory killer would end). The
estimate uses the texts as tokenized, so a large --max-length over short texts costs nothing.

The default prediction and the sweep run their token batches through the reuse evaluator
(cp_onnx.groundtruth.sweep.ReuseEvaluator), which keeps every layer's output of every batch (in memory,
then on disk), every batch's context tensors (an attention mask of seq x seq per row among them) and
works on one batch at a time: ``evaluator_bytes``. The batches are those actually built: the few-shot
texts' digit-token batches, the zero-shot questions (each asked with its answer, never cut: a question
longer than a probe item may be is refused, ``question_lengths``), the cost side's texts and general texts, a
probe suite's items; ``check_prediction`` plans them from the real token counts before anything runs.

Available memory: $CP_ONNX_MEMORY_GB, else the system's MemAvailable (what may be used without swapping).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from cp_onnx.errors import CpOnnxError
from cp_onnx.inputs import env_amount
from graph_passes.limits import gigabytes, physical_memory

MEMORY_ENV = "CP_ONNX_MEMORY_GB"
FLOAT = 4
# onnxruntime's working tensors inside one layer (scores before and after softmax, MLP activations) beside the outputs.
WORKING_FACTOR = 1.5
PLAN_ROWS = 16  # rows of a token batch of the prediction and the sweep (scoring.ProbePlan's default, predict's digit batches)
# Inside one layer, per token: the MLP's gate, up and activated products (intermediate sizes reach 5.4 x hidden, Qwen2.5),
# q, k, v and the attention output: about 20 hidden-sized floats; per token pair and head: scores, softmax, the NaN guard.
LAYER_HIDDENS, PATTERN_COPIES = 20, 3
BOOTSTRAP_COPIES = 4  # [resamples, texts] arrays the decision's bootstrap holds at once (draws, counts, their subset, weights)


@dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    heads: int
    vocab: int


def available_memory() -> int:
    """Bytes this process may use: $CP_ONNX_MEMORY_GB, else MemAvailable, else the physical memory."""
    value = env_amount(MEMORY_ENV, "gigabytes")
    if value is not None:
        return int(value * 1e9)
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return physical_memory()


def batch_bytes(shape: Shape, rows: int, length: int, *, patterns: bool = True) -> int:
    """Bytes of one batch of ``rows`` texts of ``length`` tokens: exposed activations, logits, working tensors."""
    stream = (shape.layers + 1) * rows * length * shape.hidden * FLOAT
    attention = shape.layers * rows * shape.heads * length * length * FLOAT if patterns else 0
    logits = rows * length * shape.vocab * FLOAT
    return int((stream + attention + logits) * WORKING_FACTOR)


def check_batches(shape: Shape, token_lists: Sequence[Sequence[int]], batch_size: int, *, patterns: bool = True) -> None:
    """CpOnnxError when the longest batch would not fit in memory, saying what it needs and what --max-length fits."""
    if not token_lists:
        return
    rows, length = min(batch_size, len(token_lists)), max(len(t) for t in token_lists)
    need, have = batch_bytes(shape, rows, length, patterns=patterns), available_memory()
    if need <= have:
        return
    low, high = 0, length  # the longest length that fits, by bisection (the need grows with the length)
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if batch_bytes(shape, rows, middle, patterns=patterns) <= have else (low, middle - 1)
    fits = f"--max-length {low} fits" if low else "no text length fits: lower --batch-size"
    raise CpOnnxError(
        f"texts of {length} tokens in batches of {rows} need about {gigabytes(need)} of memory ({shape.layers} layers, hidden "
        f"{shape.hidden}, {shape.heads} heads, vocabulary {shape.vocab}), and {gigabytes(have)} is available; {fits} "
        f"(or lower --batch-size; ${MEMORY_ENV} sets the memory to plan for)")


def model_shape(model, layer_map=None) -> Shape:
    """The sizes that set an analysis's memory: from the manifest, else the discovered graph (discovered here when
    ``layer_map`` is None and the manifest lacks them), else the tokenizer."""
    manifest = model.manifest or {}
    known = lambda key: isinstance(manifest.get(key), int)  # noqa: E731
    if layer_map is None and not all(map(known, ("num_layers", "hidden_size", "num_heads"))):
        import graph_passes

        layer_map = graph_passes.discover(graph_passes.graph_io.load(model.onnx_path, weights=False))

    def size(key: str, found) -> int:
        value = manifest.get(key) if known(key) else found
        return max(int(value or 1), 1)

    vocab = manifest.get("vocab_size") if known("vocab_size") else model.tokenizer.get_vocab_size()
    layers = layer_map.num_layers if layer_map is not None else manifest["num_layers"]
    found = (None, None) if layer_map is None else (layer_map.hidden_size, layer_map.num_heads)
    return Shape(layers, size("hidden_size", found[0]), size("num_heads", found[1]), max(int(vocab), 1))


def question_lengths(encode: Callable[[str], Sequence[int]], questions: Sequence[tuple[str, str, str]], limit: int) -> list[int]:
    """Tokens of each zero-shot question as the prediction asks it (prompt and answer), one at a time; CpOnnxError for
    the first longer than ``limit`` (a probe item's, MAX_ITEM_TOKENS: a question is a probe item asked alone): a
    question is never cut (cut, it would lose the answer it is scored on)."""
    from cp_onnx.models.scoring import PROMPT

    lengths = []
    for k, (question, answer, _) in enumerate(questions):
        count = len(encode(PROMPT.format(question=question) + " " + answer))
        if count > limit:
            raise CpOnnxError(f"calibration question {k + 1} ({question[:40]!r}...) is {count} tokens with its prompt and answer, more than "
                              f"the {limit} a question asked alone may take; shorten it (questions are never cut)")
        lengths.append(count)
    return lengths


def planned_batches(lengths: Sequence[int], rows: int = PLAN_ROWS) -> list[tuple[int, int]]:
    """(rows, padded length) of the batches sequences of ``lengths`` make, shortest first, ``rows`` at a time (as ProbePlan
    batches them; the digit batches split where padding would grow, so they need no more)."""
    ordered = sorted(lengths)
    return [(len(ordered[k : k + rows]), ordered[min(k + rows, len(ordered)) - 1]) for k in range(0, len(ordered), rows)]


def batch_shapes(batches) -> list[tuple[int, int]]:
    """(rows, prefix + padded length) of built TokenBatches."""
    return [(len(batch.input_ids), len(batch.prefix) + batch.input_ids.shape[1]) for batch in batches]


def evaluator_bytes(shape: Shape, batches: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """(memory, disk) the reuse evaluator needs for ``batches`` of (rows, length): every layer's output of every batch
    (kept in memory up to KeptOutputs.BUDGET, then all of it in files), every batch's context (embedding, rotary
    tables, the expanded attention mask), every layer's keys and values of the largest batch (the base pass holds them
    until it ends; counted at the hidden size, which grouped-query attention only lowers), one layer's working tensors
    for it, the head's logits, the streams of paths run together (STACK_BYTES). The model's weights (mapped from the file) and the runtime are not counted, as in
    ``batch_bytes``. Measured on SmolLM2, zero-shot, 16 questions of 274-299 tokens against 16 short ones: 1.12 GB more
    peak memory (2.31 against 1.19 GB); the estimate adds 1.45 GB (0.93 GB before the keys and values were counted)."""
    from cp_onnx.models.evaluators import HEAD_BYTES, STACK_BYTES, STACK_TOKENS, KeptOutputs

    if not batches:
        return 0, 0
    kept = sum(shape.layers * rows * length * shape.hidden * FLOAT for rows, length in batches)
    contexts = sum(rows * length * (3 * shape.hidden * FLOAT + length * FLOAT) for rows, length in batches)
    tokens = max(rows * length for rows, length in batches)
    keys_values = shape.layers * tokens * 2 * shape.hidden * FLOAT
    # a layer call runs one batch, or several paths' copies of a short one stacked up to STACK_TOKENS tokens
    working = max(max(rows * length, STACK_TOKENS) * (LAYER_HIDDENS * shape.hidden + PATTERN_COPIES * shape.heads * length) * FLOAT
                  for rows, length in batches)
    memory = min(kept, KeptOutputs.BUDGET) + contexts + keys_values + int(working * WORKING_FACTOR) + 3 * HEAD_BYTES + STACK_BYTES
    return memory, kept if kept > KeptOutputs.BUDGET else 0


def check_evaluator(shape: Shape, batches: Sequence[tuple[int, int]], what: str, *, extra: int = 0) -> None:
    """CpOnnxError when ``batches`` (rows, length) would not fit the memory available (with ``extra`` bytes held beside
    them), or their kept layer outputs the disk."""
    import shutil
    import tempfile

    need, disk = evaluator_bytes(shape, batches)
    need += extra
    have = available_memory()
    longest = max(batches, key=lambda b: b[0] * b[1] * b[1], default=(0, 0))
    sizes = (f"{len(batches)} batches, the largest {longest[0]} rows of {longest[1]} tokens; {shape.layers} layers, hidden {shape.hidden}, "
             f"{shape.heads} heads")
    if need > have:
        raise CpOnnxError(f"{what} ({sizes}) need about {gigabytes(need)} of memory, and {gigabytes(have)} is available; use fewer or "
                          f"shorter texts or questions, or a lower --max-length (${MEMORY_ENV} sets the memory to plan for)")
    folder = tempfile.gettempdir()
    free = shutil.disk_usage(folder).free
    if disk > free:
        raise CpOnnxError(f"{what} ({sizes}) keep about {gigabytes(disk)} of layer outputs in {folder}, which has {gigabytes(free)} free; "
                          "use fewer or shorter texts or questions, or point $TMPDIR at a larger disk")


def check_prediction(model, shape: Shape, token_lists: Sequence[Sequence[int]], questions: Sequence[tuple[str, str, str]],
                     max_length: int, general: Sequence[str], resamples: int, *, few_shot: bool = True) -> None:
    """The default prediction's batches planned from the real token counts and checked, before anything runs: the
    zero-shot ``questions`` asked with their answers (each refused past MAX_ITEM_TOKENS), with ``few_shot`` the texts'
    ``token_lists`` (cut after their last digit: no longer than this), and the cost side (the texts and the ``general``
    texts, cut at ``max_length``). Both regimes share one evaluator, so their batches are counted together."""
    from cp_onnx.inputs import MAX_ITEM_TOKENS

    encode = lambda text: model.encode([text])[0][0]  # noqa: E731  (as predict tokenizes)
    asked = question_lengths(encode, questions, MAX_ITEM_TOKENS) if questions else []
    written = [len(t) for t in token_lists]
    general_lengths = [len(t) for t in model.encode(list(general), max_length=max_length)[0]]
    # The decision's bootstrap draws every unit ``resamples`` times: a few float64 arrays of that size at once.
    resampling = BOOTSTRAP_COPIES * resamples * max(len(asked), len(written) if few_shot else 0) * 8
    batches = planned_batches(asked) + (planned_batches(written) if few_shot else []) + planned_batches(written + general_lengths)
    check_evaluator(shape, batches, "the default prediction's batches", extra=resampling)
