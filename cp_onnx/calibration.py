"""Calibration texts: the sets cp-onnx ships, a user's own .txt or .jsonl file, and an identity hash.

Shipped files live in ``cp_onnx/data/calibration/{set}_{language}.jsonl``, one ``{"text": ...}`` per
line. The English reasoning texts also name their ``"kind"`` (the probe suite's kinds: arithmetic,
word_problem, ...), so the prediction can say for which kinds of task a block helps; the other
languages translate its first 52 texts, in the same order, and take their kinds from the English file.
In a user's file ``"kind"`` is optional: texts without one are the user's task, "your texts".
A text may state its ``"answer"``, and, when the text is not itself the question, the ``"question"``
it answers (shipped English: 83 of the 111); the zero-shot prediction asks those questions alone and
scores the answers (``load_questions``).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path, PurePath
from typing import Any, Iterable, Iterator

from cp_onnx import inputs, shapes
from cp_onnx.errors import CpOnnxError

DATA_DIR = Path(__file__).with_name("data")
# Set name -> languages it ships in (the first is the default).
SHIPPED_SETS: dict[str, tuple[str, ...]] = {
    "reasoning": ("en", "hi", "zh", "fr"),
    "general": ("en",),
}
# The kinds of reasoning task the shipped texts and the probe suite name (in this order), so the prediction can say
# for which kinds a block helps.
TASK_KINDS = ("arithmetic", "word_problem", "comparison", "ordering", "syllogism", "sequence", "multi_step")
MIXED = "mixed"  # reasoning and general texts interleaved, reasoning first
TEXT_LINE = '{"text": "..."}'
QUESTION_LINE = '{"text": "What is 6 times 7?", "answer": "42"}'
YOUR_TEXTS = "your texts"  # the kind of a user's text that names none: the task the user calibrates for
GENERAL_KIND = "general"  # the kind of the shipped general texts (ordinary prose, no task)
_SOURCES_HINT = "reasoning, general, mixed, or a path to a .txt or .jsonl file"


def load_calibration(source: str | Path | None = None, *, n: int | None = 10, language: str = "en") -> list[str]:
    """The first ``n`` texts (all if None) of a shipped set ("reasoning" when None, "general", "mixed") or a user file.

    ``language`` picks the language of a shipped set; it is ignored for a user file.
    """
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n <= 0):
        raise CpOnnxError(f"n must be a positive number of texts, or None for all of them; got {n!r}")
    texts = [text for text, _ in _resolve_labelled(source, language)]
    return texts if n is None else texts[:n]


def load_kinds(source: str | Path | None = None, *, n: int | None = 10, language: str = "en") -> list[str]:
    """The kind of each text ``load_calibration`` gives for the same arguments (YOUR_TEXTS where a user's text names none)."""
    kinds = [kind for _, kind in _resolve_labelled(source, language)]
    return kinds if n is None else kinds[:n]


def load_questions(source: str | Path | None = None, *, language: str = "en") -> list[tuple[str, str, str]]:
    """(question, answer, kind) of every text of the source that states an ``"answer"`` (all of them, not the first n).

    The question is the line's ``"question"``, or its text when it has none (a text that is a question)."""
    name = "reasoning" if source is None else source
    if name in SHIPPED_SETS or name == MIXED:
        if language != "en" or name == "general":
            raise CpOnnxError(f"the shipped {name} texts in '{language}' state no answers, and the zero-shot prediction scores answers; "
                              f"use the English reasoning texts, or a .jsonl file whose questions carry an \"answer\"")
        path = DATA_DIR / "calibration" / "reasoning_en.jsonl"
    else:
        path = Path(name)
        if path.suffix.lower() != ".jsonl":
            raise CpOnnxError(f"{path} cannot state answers (only a .jsonl line can); give a .jsonl file whose questions carry an \"answer\"")
        read_labelled(path)  # the same checks and errors as for the texts
    questions = []
    for number, record in iter_jsonl(path, TEXT_LINE, "calibration file"):
        answer = record.get("answer")
        if answer is None:
            continue
        if not isinstance(answer, str) or not answer.strip():
            raise CpOnnxError(f'line {number} of {path} has an "answer" that is not a non-empty string; write it as text, like "42"')
        question = record.get("question", _text_field(record, number, path))
        if not isinstance(question, str) or not question.strip():
            raise CpOnnxError(f'line {number} of {path} has a "question" that is not a non-empty string; write the question as text, or leave it out')
        questions.append((question.strip(), answer.strip(), _kind_field(record, number, path)))
    if not questions:
        raise CpOnnxError(f'no calibration text in {path} states an "answer", and the zero-shot prediction scores answers; '
                          f'add "answer" to the questions, like {QUESTION_LINE}')
    return questions


def shipped_texts(name: str, language: str = "en") -> list[str]:
    """All texts of one shipped set in one language."""
    return [text for text, _ in _shipped_labelled(name, language)]


def _shipped_labelled(name: str, language: str) -> list[tuple[str, str]]:
    """(text, kind) of one shipped set: the reasoning kinds come from the English file, line for line."""
    if name not in SHIPPED_SETS:
        raise CpOnnxError(f"unknown calibration set '{name}'; use {_SOURCES_HINT}")
    languages = SHIPPED_SETS[name]
    if language not in languages:
        raise CpOnnxError(f"the shipped {name} set has no language '{language}'; use one of {', '.join(languages)}, or pass your own file")
    labelled = read_labelled(DATA_DIR / "calibration" / f"{name}_{language}.jsonl")
    if name == "general":
        return [(text, GENERAL_KIND) for text, _ in labelled]
    english = read_labelled(DATA_DIR / "calibration" / f"{name}_en.jsonl")
    return [(text, kind) for (text, _), (_, kind) in zip(labelled, english)]


def read_texts(path: str | Path) -> list[str]:
    """Texts of a .txt file (one per line, blank lines skipped) or a .jsonl file (a "text" field per line)."""
    return [text for text, _ in read_labelled(path)]


def read_labelled(path: str | Path) -> list[tuple[str, str]]:
    """(text, kind) of each text of a calibration file: a .jsonl line's optional "kind", else YOUR_TEXTS."""
    path = Path(path)
    if not path.is_file():
        raise CpOnnxError(f"no calibration file at {path}; pass an existing .txt or .jsonl file, or one of the shipped sets (reasoning, general, mixed)")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        texts = [(line.strip(), YOUR_TEXTS) for line in read_lines(path, "calibration file")]
    elif suffix == ".jsonl":
        texts = [(_text_field(record, number, path), _kind_field(record, number, path))
                 for number, record in iter_jsonl(path, TEXT_LINE, "calibration file")]
    else:
        raise CpOnnxError(f"calibration file {path} is neither .txt nor .jsonl; use .txt (one text per line) or .jsonl (one {TEXT_LINE} per line)")
    texts = [(text, kind) for text, kind in texts if text.strip()]
    if not texts:
        raise CpOnnxError(f"no calibration texts in {path}; the file needs at least one non-empty line")
    return texts


def read_lines(path: Path, what: str = "text file") -> list[str]:
    """The lines of a UTF-8 text file (a byte-order mark is tolerated), within the size limits of ``inputs``."""
    return inputs.split_lines(inputs.read_text(path, what, encoding="utf-8-sig"), path, what)


def iter_jsonl(path: Path, example: str, what: str = "JSONL file") -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSONL file; ``example`` shows a good line in errors."""
    for number, line in enumerate(read_lines(path, what), start=1):
        if not line.strip():
            continue
        record = shapes.parse_json(line, f"line {number} of {path}", f"write one object per line, like {example}")
        if not isinstance(record, dict):
            raise CpOnnxError(f"line {number} of {path} is not a JSON object; write one object per line, like {example}")
        yield number, record


def calibration_identity(texts: Iterable[str], settings: dict[str, Any]) -> str:
    """sha256 hex of the canonical JSON ``{"settings": ..., "texts": [...]}`` (sorted keys, no spaces, UTF-8)."""
    if isinstance(texts, str):
        raise CpOnnxError("calibration_identity needs a list of texts, not a single string; wrap it in a list")
    canonical = json.dumps({"settings": settings, "texts": list(texts)}, sort_keys=True, ensure_ascii=False,
                           separators=(",", ":"), default=_plain)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _resolve_labelled(source: str | Path | None, language: str) -> list[tuple[str, str]]:
    name = "reasoning" if source is None else source
    if name == MIXED:
        return _interleave(_shipped_labelled("reasoning", language), _shipped_labelled("general", language))
    if isinstance(name, str) and name in SHIPPED_SETS:
        return _shipped_labelled(name, language)
    path = Path(name)
    if not path.suffix and not path.exists():
        raise CpOnnxError(f"unknown calibration set '{name}'; use {_SOURCES_HINT}")
    return read_labelled(path)


def _interleave(first: list, second: list) -> list:
    """first[0], second[0], first[1], ...; what is left of the longer list comes last."""
    merged = [text for pair in zip(first, second) for text in pair]
    shorter = min(len(first), len(second))
    return merged + first[shorter:] + second[shorter:]


def _text_field(record: dict, number: int, path: Path) -> str:
    text = record.get("text")
    if not isinstance(text, str):
        raise CpOnnxError(f'line {number} of {path} has no "text" string; write one object per line, like {TEXT_LINE}')
    return text


def _kind_field(record: dict, number: int, path: Path) -> str:
    kind = record.get("kind", YOUR_TEXTS)
    if not isinstance(kind, str) or not kind.strip():
        raise CpOnnxError(f'line {number} of {path} has a "kind" that is not a non-empty string; give a name like "arithmetic", or leave "kind" out')
    return kind.strip()


def _plain(value: Any) -> Any:
    """JSON form of the few non-JSON setting values worth accepting (paths, numpy values)."""
    if isinstance(value, PurePath):
        return value.as_posix()
    if hasattr(value, "tolist"):
        return value.tolist()
    raise CpOnnxError(f"setting value {value!r} cannot go into the calibration identity; use strings, numbers, booleans, lists or dicts")
