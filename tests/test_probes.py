"""Probe suites: determinism, shape, answers re-derived here from the prompt text alone, files, and disjointness."""
from __future__ import annotations

import json
import re
from fractions import Fraction
from pathlib import Path

import pytest

from cp_onnx.calibration import SHIPPED_SETS, load_calibration
from cp_onnx.errors import CpOnnxError
from cp_onnx.calibration import TASK_KINDS
from cp_onnx.groundtruth.probes import general_texts, load_suite, probe_suite, save_suite
from cp_onnx.models.scoring import ProbeItem

CHOICE_KINDS = {"comparison", "ordering", "syllogism"}
ITEM_LINE = '{"kind": "arithmetic", "prompt": "Question: What is 2 + 3?\\nAnswer:", "answer": " 5"}'


@pytest.fixture(scope="module")
def suites() -> dict[int, list[ProbeItem]]:
    return {seed: probe_suite(seed) for seed in (0, 1)}


def solved_and_asked(prompt: str) -> tuple[list[tuple[str, str]], str]:
    """The demonstrations as (question, bare answer) and the question the item asks."""
    *shown, asked = prompt.split("\n\n")
    demos = [re.fullmatch(r"Question: (.+)\nAnswer: (\S+)", block).groups() for block in shown]
    return demos, re.fullmatch(r"Question: (.+)\nAnswer:", asked).group(1)


def ints(text: str) -> list[int]:
    return [int(v) for v in re.findall(r"\d+", text)]


def exact(value: Fraction) -> str:
    assert value.denominator == 1 and value > 0, value
    return str(value.numerator)


# --- independent solvers: each reads only the question text ---

def solve_arithmetic(q: str) -> str:
    a, op, b = re.fullmatch(r"What is (\d+) (\+|-|times|divided by) (\d+)\?", q).groups()
    a, b = Fraction(a), Fraction(b)
    return exact({"+": a + b, "-": a - b, "times": a * b, "divided by": a / b}[op])


def solve_word_problem(q: str) -> str:
    a, b = map(Fraction, ints(q))
    rules = {" buys ": a + b, " gives ": a - b, " in each box": a * b, " equally among ": a / b, " costs ": a * b}
    (value,) = [v for key, v in rules.items() if key in q]
    return exact(value)


def solve_comparison(q: str) -> str:
    if m := re.fullmatch(r"Which number is (larger|smaller), (\d+) or (\d+)\?", q):
        pick = max if m[1] == "larger" else min
        return str(pick(int(m[2]), int(m[3])))
    if m := re.fullmatch(r"Is (\d+) (greater|less) than (\d+)\?", q):
        a, b = int(m[1]), int(m[3])
        return "yes" if (a > b if m[2] == "greater" else a < b) else "no"
    m = re.fullmatch(r"A (\w+) weighs (\d+) kilograms and a (\w+) weighs (\d+) kilograms\. "
                     r"Which is (heavier|lighter), the \1 or the \3\?", q)
    weights = {m[1]: int(m[2]), m[3]: int(m[4])}
    return (max if m[5] == "heavier" else min)(weights, key=weights.get)


SUPERLATIVES = {"tallest": ("taller", True), "shortest": ("taller", False), "oldest": ("older", True),
                "youngest": ("older", False), "fastest": ("faster", True), "slowest": ("faster", False)}


def solve_ordering(q: str) -> str:
    facts = re.findall(r"(\w+) is (\w+) than (\w+)\.", q)
    comparative, greatest = SUPERLATIVES[re.search(r"Who is the (\w+)\?$", q)[1]]
    assert {c for _, c, _ in facts} == {comparative}
    above = {x for x, _, _ in facts}
    below = {y for _, _, y in facts}
    (answer,) = (above - below) if greatest else (below - above)
    assert len(above | below) == len(facts) + 1  # a chain: every name placed, nothing left open
    return answer


def solve_syllogism(q: str) -> str:
    """Yes exactly when the premises entail the asked membership (forward chaining over all/no/not)."""
    subsets = {(a, b) for a, b in re.findall(r"[Aa]ll (\w+)s are (\w+)s", q)}
    disjoint = {frozenset(pair) for pair in re.findall(r"No (\w+)s are (\w+)s", q)}
    who, negated, category = re.search(r"\. (\w+) is (not )?an? (\w+)\.", q).groups()
    asked_who, asked = re.search(r"(?:Is|Must) (\w+) (?:be )?an? (\w+)\?$", q).groups()
    assert who == asked_who
    known = {category: not negated}
    changed = True
    while changed:
        changed = False
        for cat, member in list(known.items()):
            implied = ([(b, True) for a, b in subsets if a == cat] if member else [(a, False) for a, b in subsets if b == cat])
            if member:
                implied += [(other, False) for pair in disjoint if cat in pair for other in pair - {cat}]
            for c, v in implied:
                assert known.get(c, v) == v, q  # premises never contradict
                if c not in known:
                    known[c], changed = v, True
    return "yes" if known.get(asked) is True else "no"


def solve_sequence(q: str) -> str:
    terms = ints(re.fullmatch(r"What number comes next in the sequence ([\d, ]+)\?", q)[1])
    steps = {b - a for a, b in zip(terms, terms[1:])}
    if len(steps) == 1:
        return exact(Fraction(terms[-1] + steps.pop()))
    (ratio,) = {Fraction(b, a) for a, b in zip(terms, terms[1:])}
    return exact(terms[-1] * ratio)


def solve_multi_step(q: str) -> str:
    n = ints(q)
    if " buys " in q and " gives " in q:
        value = n[0] + n[1] - n[2]
    elif q.startswith("Start with") and "double the result" in q:
        value = 2 * (n[0] + n[1])
    elif re.fullmatch(r"What is \d+ \+ \d+ \+ \d+\?", q):
        value = sum(n)
    elif " in each bag, and " in q or re.fullmatch(r"What is \d+ times \d+ plus \d+\?", q):
        value = n[0] * n[1] + n[2]
    else:
        raise AssertionError(f"unrecognised multi-step question: {q}")
    return exact(Fraction(value))


SOLVERS = {"arithmetic": solve_arithmetic, "word_problem": solve_word_problem, "comparison": solve_comparison,
           "ordering": solve_ordering, "syllogism": solve_syllogism, "sequence": solve_sequence,
           "multi_step": solve_multi_step}


def test_solvers_on_hand_worked_questions():
    """The solvers themselves, on questions answered by hand (so a wrong solver cannot hide a wrong suite)."""
    assert solve_arithmetic("What is 56 divided by 7?") == "8"
    assert solve_word_problem("Ivy has 13 cards and gives 5 of them to Tom. How many cards does Ivy have left?") == "8"
    assert solve_comparison("A lamp weighs 7 kilograms and a drum weighs 12 kilograms. Which is lighter, the lamp or the drum?") == "lamp"
    assert solve_ordering("Ben is older than Ada. Tom is older than Ben. Who is the youngest?") == "Ada"
    assert solve_syllogism("All wugs are tivs. Bo is not a tiv. Is Bo a wug?") == "no"
    assert solve_syllogism("All oaks are trees, and all trees are plants. Pip is an oak. Must Pip be a plant?") == "yes"
    assert solve_syllogism("All roses are flowers. Pip is a flower. Must Pip be a rose?") == "no"
    assert solve_sequence("What number comes next in the sequence 3, 6, 12, 24?") == "48"
    assert solve_multi_step("Start with 4, add 3, and then double the result. What number do you get?") == "14"


# --- the generated suite ---

def test_kinds_counts_and_ids(suites):
    assert TASK_KINDS == ("arithmetic", "word_problem", "comparison", "ordering", "syllogism", "sequence", "multi_step")
    for items in suites.values():
        assert len(items) == 336
        assert [item.kind for item in items] == [kind for kind in TASK_KINDS for _ in range(48)]
        assert [item.id for item in items] == [f"{kind}-{i:03d}" for kind in TASK_KINDS for i in range(48)]
        asked = [solved_and_asked(item.shots + item.prompt)[1] for item in items]
        assert len(set(asked)) == len(asked)


def test_same_seed_same_suite_other_seed_other_items(suites):
    assert probe_suite(0) == suites[0]
    assert probe_suite(0, 7) == [item for item in suites[0] if int(item.id[-3:]) < 7]  # smaller suites are prefixes
    asked = {seed: {solved_and_asked(item.shots + item.prompt)[1] for item in items} for seed, items in suites.items()}
    assert len(asked[0] & asked[1]) < 0.1 * len(asked[0])
    assert probe_suite(2, 3) != probe_suite(3, 3)


def test_prompt_and_answer_shape(suites):
    for item in suites[0]:
        demos, asked = solved_and_asked(item.shots + item.prompt)
        assert item.prompt == f"Question: {asked}\nAnswer:"  # the zero-shot form: the question alone
        assert item.shots == "".join(f"Question: {q}\nAnswer: {a}\n\n" for q, a in demos)
        assert len(demos) == 2
        assert re.fullmatch(r" [A-Za-z0-9]+", item.answer), item
        if item.kind in CHOICE_KINDS:
            assert item.answer in item.options and len(set(item.options)) == len(item.options) >= 2
            assert all(re.fullmatch(r" [A-Za-z0-9]+", option) for option in item.options)
        else:
            assert item.options == ()
            assert 1 <= int(item.answer) <= 99  # at most three tokens even with one token per digit
    for item in suites[0] + suites[1]:
        assert not re.search(r"\b1 (?:more )?[a-z]+s\b", item.prompt), item  # "1 apple", never "1 apples"
    bare = probe_suite(0, 2, shots=0)
    assert all(solved_and_asked(item.shots + item.prompt)[0] == [] and item.shots == "" for item in bare)


def test_every_answer_rederived_from_the_prompt(suites):
    for items in suites.values():
        for item in items:
            demos, asked = solved_and_asked(item.shots + item.prompt)
            solve = SOLVERS[item.kind]
            assert " " + solve(asked) == item.answer, item
            for question, answer in demos:
                assert question != asked and solve(question) == answer, (item.id, question)
            if item.kind in CHOICE_KINDS and item.kind != "syllogism":
                named = set(re.findall(r"\b[A-Za-z0-9]+\b", asked))
                assert {o.strip() for o in item.options} <= named | {"yes", "no"}


def test_answers_are_balanced_and_small(suites):
    items = suites[0]
    syllogisms = [i.answer for i in items if i.kind == "syllogism"]
    assert 0.35 <= syllogisms.count(" yes") / len(syllogisms) <= 0.65
    for kind in ("comparison", "ordering"):
        positions = [i.options.index(i.answer) for i in items if i.kind == kind]
        assert len(set(positions)) >= 2 and positions.count(0) < 0.8 * len(positions)
    operands = [n for i in items if i.kind == "arithmetic" for n in ints(solved_and_asked(i.shots + i.prompt)[1])]
    assert sorted(operands)[len(operands) // 2] <= 20  # a 135M model should get some of these right


@pytest.mark.parametrize("kwargs, message", [
    ({"per_kind": 0}, "per_kind must be a whole number >= 1; got 0"),
    ({"per_kind": True}, "per_kind must be a whole number >= 1; got True"),
    ({"per_kind": 2.0}, "per_kind must be a whole number >= 1; got 2.0"),
    ({"shots": -1}, "shots must be a whole number >= 0; got -1"),
])
def test_bad_suite_arguments(kwargs, message):
    with pytest.raises(CpOnnxError) as caught:
        probe_suite(**kwargs)
    assert str(caught.value) == message


# --- files ---

def test_save_then_load_round_trip(tmp_path, suites):
    items = suites[1][::11]
    path = save_suite(items, tmp_path / "new" / "suite.jsonl")
    assert load_suite(path) == items
    assert [p.name for p in path.parent.iterdir()] == ["suite.jsonl"]  # no temporary left behind
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    shots = [r for r in records if "prompt" not in r]  # a kind's shared shots, written once before its first item
    assert [r["kind"] for r in shots] == list(dict.fromkeys(i.kind for i in items)) and all(set(r) == {"kind", "shots"} for r in shots)
    assert all(("options" in r) == (r["kind"] in CHOICE_KINDS) and "shots" not in r for r in records if "prompt" in r)
    save_suite(items[:2], path)  # overwrites whole
    assert load_suite(path) == items[:2]


def test_save_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(CpOnnxError, match=r"^cannot write the probe suite to .*; choose another path$"):
        save_suite(probe_suite(0, 1), blocker / "suite.jsonl")


def test_load_user_suite_with_default_ids(tmp_path):
    lines = [
        {"kind": "capitals", "prompt": "Q: capital of France?\nA:", "answer": " Paris"},
        {"id": "mine", "kind": "capitals", "prompt": "Q: capital of Peru?\nA:", "answer": " Lima", "options": [" Lima", " Quito"]},
        {"kind": "capitals", "prompt": "Q: capital of Chad?\nA:", "answer": " N'Djamena"},
        {"kind": "arithmetic", "prompt": "2 + 2 =", "answer": " 4"},
    ]
    path = tmp_path / "user.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n", encoding="utf-8")
    items = load_suite(path)
    assert [i.id for i in items] == ["capitals-000", "mine", "capitals-002", "arithmetic-000"]
    assert items[1] == ProbeItem("mine", "capitals", "Q: capital of Peru?\nA:", " Lima", (" Lima", " Quito"))


def load_error(tmp_path: Path, text: str, name: str = "s.jsonl") -> tuple[str, Path]:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    with pytest.raises(CpOnnxError) as caught:
        load_suite(path)
    return str(caught.value), path


def test_load_errors_name_the_line(tmp_path):
    good = json.dumps({"kind": "k", "prompt": "p", "answer": " a"})
    cases = [
        (f"{good}\nnot json\n", 'line 2 of {p} is not valid JSON (Expecting value); write one object per line, like ' + ITEM_LINE),
        (f'{good}\n{{"kind": "k", "answer": " a"}}\n',
         'line 2 of {p} has no non-empty "prompt" string; every line needs kind, prompt and answer, like ' + ITEM_LINE),
        ('\n{"kind": "k", "prompt": "p", "answer": "  "}\n',
         'line 2 of {p} has no non-empty "answer" string; every line needs kind, prompt and answer, like ' + ITEM_LINE),
        ('{"kind": "k", "prompt": "p", "answer": " a", "options": " a"}\n',
         'line 1 of {p} has "options" that are not a list of strings; write them like ["yes", "no"] with the answer among them'),
        ('{"kind": "k", "prompt": "p", "answer": " a", "options": ["a", " b"]}\n',
         "line 1 of {p} has options ['a', ' b'] without its answer ' a'; add the answer to the options, spelled the same way"),
        ('{"kind": ["k"], "prompt": "p", "answer": " a"}\n',
         'line 1 of {p} has no non-empty "kind" string; every line needs kind, prompt and answer, like ' + ITEM_LINE),
        ('{"id": "", "kind": "k", "prompt": "p", "answer": " a"}\n',
         'line 1 of {p} has an "id" that is not a non-empty string; use a string such as "arithmetic-007" or leave it out'),
        ('{"id": 5, "kind": "k", "prompt": "p", "answer": " a"}\n',
         'line 1 of {p} has an "id" that is not a non-empty string; use a string such as "arithmetic-007" or leave it out'),
        (f'{good}\n{{"id": "k-000", "kind": "j", "prompt": "p", "answer": " a"}}\n',
         "line 2 of {p} repeats the id 'k-000' of line 1; give every item its own id"),
        ("\n\n", "no probe items in {p}; the file needs at least one line like " + ITEM_LINE),
    ]
    for text, expected in cases:
        message, path = load_error(tmp_path, text)
        assert message == expected.replace("{p}", str(path))


def test_load_missing_or_wrong_file(tmp_path):
    missing = tmp_path / "none.jsonl"
    with pytest.raises(CpOnnxError) as caught:
        load_suite(missing)
    assert str(caught.value) == f"no probe suite at {missing}; pass an existing .jsonl file with one item per line, like {ITEM_LINE}"
    message, path = load_error(tmp_path, "x\n", name="s.json")
    assert message == f"probe suite {path} is not a .jsonl file; write one item per line, like {ITEM_LINE}"


# --- general text and disjointness ---

def normal(text: str) -> str:
    return " ".join(re.sub(r"[^\w]+", " ", text.lower()).split())


def test_general_texts_are_paragraphs_distinct_from_calibration():
    texts = general_texts()
    assert len(texts) >= 40 and len(set(texts)) == len(texts)
    for text in texts:
        assert 2 <= len(re.findall(r"[.?!](?:\s|$)", text)) <= 4, text
    calibration = [normal(t) for t in load_calibration("mixed", n=None)]
    for text in map(normal, texts):
        assert not any(text in c or c in text for c in calibration), text


def test_calibration_texts_share_no_question_with_probes(suites):
    calibration = {normal(t) for name, langs in SHIPPED_SETS.items() for lang in langs
                   for t in load_calibration(name, n=None, language=lang)}
    questions = set()
    for items in suites.values():
        for item in items:
            demos, asked = solved_and_asked(item.shots + item.prompt)
            questions |= {normal(asked)} | {normal(q) for q, _ in demos}
    assert len(questions) > 600
    clashes = [(q, c) for q in questions for c in calibration if q in c or c in q]
    assert clashes == []


def test_items_of_a_kind_share_their_solved_examples(suites):
    for items in suites.values():
        for kind in TASK_KINDS:
            shown = {tuple(solved_and_asked(item.shots + item.prompt)[0]) for item in items if item.kind == kind}
            assert len(shown) == 1, kind  # one few-shot prefix per kind: a KV cache runs it once
            (demos,) = shown
            assert all(solved_and_asked(item.shots + item.prompt)[1] not in {q for q, _ in demos} for item in items if item.kind == kind)
    assert solved_and_asked(suites[0][0].shots + suites[0][0].prompt)[0] != solved_and_asked(suites[1][0].shots + suites[1][0].prompt)[0]  # seeds differ
