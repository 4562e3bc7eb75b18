"""Calibration texts: the shipped sets, the loaders for user files, and the identity hash."""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest

from cp_onnx.calibration import SHIPPED_SETS, calibration_identity, load_calibration, load_questions
from cp_onnx.errors import CpOnnxError

DATA = Path(__file__).resolve().parents[1] / "cp_onnx" / "data" / "calibration"
SCRIPTS = {"hi": re.compile(r"[\u0900-\u097F]"), "zh": re.compile(r"[\u4e00-\u9fff]")}


def file_texts(name: str) -> list[str]:
    """The texts of a shipped file, read here with plain json, independently of the loader."""
    lines = (DATA / name).read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["text"] for line in lines if line.strip()]


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def error_of(*args, **kwargs) -> str:
    with pytest.raises(CpOnnxError) as caught:
        load_calibration(*args, **kwargs)
    return str(caught.value)


# --- shipped sets ---

def test_shipped_sets_are_the_files_on_disk():
    assert SHIPPED_SETS == {"reasoning": ("en", "hi", "zh", "fr"), "general": ("en",)}
    assert sorted(p.name for p in DATA.glob("*.jsonl")) == sorted(
        f"{name}_{lang}.jsonl" for name, langs in SHIPPED_SETS.items() for lang in langs)
    for name, languages in SHIPPED_SETS.items():
        for language in languages:
            texts = load_calibration(name, n=None, language=language)
            assert texts == file_texts(f"{name}_{language}.jsonl")
            assert len(texts) >= 30 and len(set(texts)) == len(texts)
            assert all(t == t.strip() and t for t in texts)


def test_english_texts_are_short():
    for name in SHIPPED_SETS:
        for text in load_calibration(name, n=None):
            sentences = re.findall(r"[.?!](?:\s|$)", text)
            assert 1 <= len(sentences) <= 3, text


def test_translations_are_parallel_and_in_their_language():
    english = load_calibration("reasoning", n=None)
    for language in ("hi", "zh", "fr"):
        translated = load_calibration("reasoning", n=None, language=language)
        assert len(translated) == 52  # the first 52 English texts; the English set goes on with more of each kind
        for en, other in zip(english, translated):
            # the same numbers in the same problem: catches a shifted line or a dropped quantity
            assert sorted(re.findall(r"\d+", other)) == sorted(re.findall(r"\d+", en)), (en, other)
            if language in SCRIPTS:
                assert SCRIPTS[language].search(other), other
            else:
                assert other != en and not any(s.search(other) for s in SCRIPTS.values())


def test_default_is_the_first_ten_english_reasoning_texts():
    assert load_calibration() == file_texts("reasoning_en.jsonl")[:10]
    assert load_calibration(None, n=3, language="zh") == file_texts("reasoning_zh.jsonl")[:3]
    assert load_calibration("general", n=4) == file_texts("general_en.jsonl")[:4]


def test_mixed_alternates_reasoning_first():
    reasoning, general = file_texts("reasoning_en.jsonl"), file_texts("general_en.jsonl")
    mixed = load_calibration("mixed", n=None)
    assert mixed[:4] == [reasoning[0], general[0], reasoning[1], general[1]]
    pairs = 2 * min(len(reasoning), len(general))
    assert mixed[:pairs:2] == reasoning[: pairs // 2] and mixed[1:pairs:2] == general[: pairs // 2]
    assert mixed[pairs:] == reasoning[pairs // 2 :] + general[pairs // 2 :]  # what is left of the longer set comes last
    assert load_calibration("mixed", n=5) == mixed[:5]


def test_n_larger_than_the_set_gives_all():
    assert load_calibration("general", n=10_000) == file_texts("general_en.jsonl")


# --- user files ---

def test_txt_one_text_per_line_blank_lines_skipped(tmp_path):
    path = write(tmp_path / "texts.txt", "\ufeffFirst text.\n\n   \n  Second text, indented.  \r\nThird.\n")
    assert load_calibration(path, n=None) == ["First text.", "Second text, indented.", "Third."]
    assert load_calibration(str(path), n=2) == ["First text.", "Second text, indented."]
    assert load_calibration(path) == ["First text.", "Second text, indented.", "Third."]  # n=10 > 3


def test_jsonl_text_field(tmp_path):
    lines = [json.dumps({"text": "Première ligne.", "id": 7}, ensure_ascii=False), "", json.dumps({"text": "  "}),
             json.dumps({"text": "Zweite Zeile.", "source": "x"})]
    path = write(tmp_path / "texts.JSONL", "\n".join(lines) + "\n")
    assert load_calibration(path, n=None) == ["Première ligne.", "Zweite Zeile."]
    assert load_calibration(path, n=1, language="hi") == ["Première ligne."]  # language only picks shipped sets


def test_file_errors(tmp_path):
    missing = tmp_path / "nope.txt"
    assert error_of(missing) == (f"no calibration file at {missing}; pass an existing .txt or .jsonl file, "
                                 "or one of the shipped sets (reasoning, general, mixed)")
    csv = write(tmp_path / "texts.csv", "a,b\n")
    assert error_of(csv) == (f"calibration file {csv} is neither .txt nor .jsonl; use .txt (one text per line) "
                             'or .jsonl (one {"text": "..."} per line)')
    empty = write(tmp_path / "empty.txt", "\n  \n\n")
    assert error_of(empty) == f"no calibration texts in {empty}; the file needs at least one non-empty line"
    empty_jsonl = write(tmp_path / "empty.jsonl", '{"text": ""}\n\n')
    assert error_of(empty_jsonl) == f"no calibration texts in {empty_jsonl}; the file needs at least one non-empty line"
    latin = tmp_path / "latin.txt"
    latin.write_bytes("café\n".encode("latin-1"))
    assert error_of(latin) == f"{latin} is not UTF-8 text; save it with UTF-8 encoding"


def test_jsonl_line_errors_name_the_line(tmp_path):
    good = json.dumps({"text": "fine"})
    bad_json = write(tmp_path / "bad.jsonl", f"{good}\n\n{{text: oops}}\n")
    assert error_of(bad_json) == (f"line 3 of {bad_json} is not valid JSON (Expecting property name enclosed in "
                                  'double quotes); write one object per line, like {"text": "..."}')
    not_object = write(tmp_path / "list.jsonl", f'{good}\n["fine"]\n')
    assert error_of(not_object) == (f"line 2 of {not_object} is not a JSON object; write one object per line, "
                                    'like {"text": "..."}')
    no_text = write(tmp_path / "notext.jsonl", f'{good}\n{good}\n{{"body": "x"}}\n{{"text": 3}}\n')
    assert error_of(no_text) == (f'line 3 of {no_text} has no "text" string; write one object per line, '
                                 'like {"text": "..."}')


def test_set_language_and_n_errors():
    assert error_of("reasonning") == ("unknown calibration set 'reasonning'; use reasoning, general, mixed, "
                                      "or a path to a .txt or .jsonl file")
    assert error_of("reasoning", language="de") == ("the shipped reasoning set has no language 'de'; "
                                                    "use one of en, hi, zh, fr, or pass your own file")
    assert error_of("general", language="fr") == ("the shipped general set has no language 'fr'; "
                                                  "use one of en, or pass your own file")
    assert error_of("mixed", language="zh") == ("the shipped general set has no language 'zh'; "
                                                "use one of en, or pass your own file")
    for n in (0, -3, 2.5, True):
        assert error_of("reasoning", n=n) == f"n must be a positive number of texts, or None for all of them; got {n!r}"


# --- identity ---

def test_identity_is_sha256_of_canonical_json():
    texts, settings = ["Un texte.", "第二"], {"max_length": 128, "block_sizes": [3, 4, 5]}
    canonical = '{"settings":{"block_sizes":[3,4,5],"max_length":128},"texts":["Un texte.","第二"]}'
    assert calibration_identity(texts, settings) == hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def test_identity_stable_and_sensitive():
    texts, settings = load_calibration(), {"max_length": 128, "language": "en", "block_sizes": [3, 4, 5]}
    base = calibration_identity(texts, settings)
    assert re.fullmatch(r"[0-9a-f]{64}", base)
    assert calibration_identity(list(texts), dict(reversed(settings.items()))) == base  # key order does not matter
    assert calibration_identity(tuple(texts), {**settings, "block_sizes": (3, 4, 5)}) == base
    assert calibration_identity(texts, {**settings, "block_sizes": np.array([3, 4, 5])}) == base
    changed = [
        calibration_identity(texts[:-1], settings),
        calibration_identity(texts[::-1], settings),
        calibration_identity(texts[:-1] + [texts[-1] + " "], settings),
        calibration_identity(texts, {**settings, "max_length": 64}),
        calibration_identity(texts, {**settings, "extra": None}),
    ]
    assert base not in changed and len(set(changed)) == len(changed)


def test_identity_rejects_what_it_cannot_hash():
    with pytest.raises(CpOnnxError, match="^calibration_identity needs a list of texts, not a single string"):
        calibration_identity("one text", {})
    with pytest.raises(CpOnnxError, match=r"^setting value <object .*> cannot go into the calibration identity"):
        calibration_identity(["a"], {"x": object()})
    assert calibration_identity(["a"], {"p": Path("x/y")}) == calibration_identity(["a"], {"p": "x/y"})


def test_shipped_questions_state_right_answers():
    """The zero-shot questions: every answer stated, and the arithmetic ones checked by computing them."""

    questions = load_questions()
    assert len(questions) == 83 and all(q.endswith("?") and a and a == a.strip() for q, a, _ in questions)
    operations = {"plus": "+", "minus": "-", "times": "*", "divided by": "/"}
    checked = 0
    for question, answer, _ in questions:
        match = re.fullmatch(r"What is (\d+) (plus|minus|times|divided by) (\d+)\?", question)
        if match:
            assert float(answer) == eval(f"{match[1]} {operations[match[2]]} {match[3]}")  # noqa: S307 (digits and one operator)
            checked += 1
    assert checked >= 6
    with pytest.raises(CpOnnxError, match="state no answers"):
        load_questions("reasoning", language="zh")


def test_user_questions_take_the_question_field_or_the_text(tmp_path):

    path = tmp_path / "qa.jsonl"
    path.write_text('{"text": "What is 6 times 7?", "answer": " 42 "}\n{"text": "No answer here."}\n'
                    '{"text": "Tin is a metal, so it conducts.", "question": "Does tin conduct?", "answer": "Yes", "kind": "syllogism"}\n')
    assert load_questions(str(path)) == [("What is 6 times 7?", "42", "your texts"), ("Does tin conduct?", "Yes", "syllogism")]
    path.write_text('{"text": "What is 6 times 7?"}\n')
    with pytest.raises(CpOnnxError, match='states an "answer"'):
        load_questions(str(path))
    path.write_text('{"text": "What is 6 times 7?", "answer": 42}\n')
    with pytest.raises(CpOnnxError, match="line 1 .* not a non-empty string"):
        load_questions(str(path))
    txt = tmp_path / "qa.txt"
    txt.write_text("What is 6 times 7?\n")
    with pytest.raises(CpOnnxError, match="cannot state answers"):
        load_questions(str(txt))
