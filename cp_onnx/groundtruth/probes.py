"""Reasoning probe suites with known answers (generated from a seed, or a user's JSONL), and general text for perplexity.

Teacher-forcing convention: a prompt ends exactly where its answer starts, with no trailing
whitespace ("Question: What is 17 + 25?\\nAnswer:"), and every answer and option starts with one
space (" 42", " yes", " Anna"). BPE tokenizers attach a space to the word after it, so an answer is
split as it would be in running text and the prompt's tokens are a prefix of those of prompt + answer.
Generated numeric answers stay within 1..99, so they take at most three tokens even where digits
are split one by one (SmolLM2: " 42" is " ", "4", "2").
"""
from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterable

from cp_onnx.calibration import DATA_DIR, TASK_KINDS, iter_jsonl, read_texts
from cp_onnx.errors import CpOnnxError
from cp_onnx.inputs import MAX_PROBE_OPTIONS
from cp_onnx.files import write_text
from cp_onnx.models.scoring import PROMPT, ProbeItem

ITEM_LINE = '{"kind": "arithmetic", "prompt": "Question: What is 2 + 3?\\nAnswer:", "answer": " 5"}'
KIND_SHOTS_LINE = '{"kind": "arithmetic", "shots": "Question: What is 1 + 1?\\nAnswer: 2\\n\\n"}'

# Names that are one token with a leading space in common BPE vocabularies, so name answers stay short.
NAMES = ("Tom", "Anna", "Ben", "Mia", "Leo", "Max", "Emma", "Lily", "Jack", "Sam", "Omar", "Paul",
         "Kate", "Hugo", "Ada", "Eli", "Ivy", "Finn", "Rosa")
PETS = ("Rex", "Pip", "Bo", "Luna", "Coco", "Milo", "Toby", "Nell")
THINGS = ("apple", "pencil", "sticker", "marble", "cookie", "book", "shell", "card", "stamp", "balloon")
OBJECTS = ("box", "bag", "chair", "lamp", "table", "drum", "basket", "bucket", "bottle", "stone")
# comparative, superlative at the greater end, superlative at the lesser end
RELATIONS = (("taller", "tallest", "shortest"), ("older", "oldest", "youngest"), ("faster", "fastest", "slowest"))
# Real category chains, most specific first; every word makes its plural with -s.
CHAINS = (("sparrow", "bird", "animal"), ("rose", "flower", "plant"), ("oak", "tree", "plant"),
          ("dog", "mammal", "animal"), ("hammer", "tool", "object"), ("car", "vehicle", "machine"),
          ("apple", "fruit", "food"), ("violin", "instrument", "object"))
# Made-up categories, so that premises like "No wugs are zorbs" cannot clash with what a model knows.
NONSENSE = ("wug", "blicket", "zorb", "glim", "tiv", "norp", "fep", "plonk")


Generated = tuple[str, str, tuple[str, ...]]  # question, bare answer, bare options


def _number(rng: random.Random) -> int:
    """An operand for the number problems: mostly one digit, else up to 20 (so a 135M model gets some right)."""
    return rng.randint(1, 9) if rng.random() < 0.6 else rng.randint(10, 20)


def _story(rng: random.Random) -> tuple[str, str, str, int, int]:
    """The cast of a story problem: two people, a countable thing, two operands."""
    who, other = rng.sample(NAMES, 2)
    return who, other, rng.choice(THINGS), _number(rng), _number(rng)


def _arithmetic(rng: random.Random) -> Generated:
    op = rng.choice(("+", "-", "times", "divided by"))
    if op == "+":
        a, b = _number(rng), _number(rng)
        return f"What is {a} + {b}?", str(a + b), ()
    if op == "-":
        b, difference = _number(rng), _number(rng)
        return f"What is {b + difference} - {b}?", str(difference), ()
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    if op == "times":
        return f"What is {a} times {b}?", str(a * b), ()
    return f"What is {a * b} divided by {a}?", str(b), ()


def _word_problem(rng: random.Random) -> Generated:
    who, other, thing, a, b = _story(rng)
    form = rng.randrange(5)
    if form == 0:
        return f"{who} has {a} {_noun(thing, a)} and buys {b} more. How many {thing}s does {who} have now?", str(a + b), ()
    if form == 1:
        return f"{who} has {a + b} {thing}s and gives {b} of them to {other}. How many {thing}s does {who} have left?", str(a), ()
    a, b = rng.randint(2, 6), rng.randint(2, 9)
    if form == 2:
        return f"There are {a} boxes with {b} {thing}s in each box. How many {thing}s are there in all?", str(a * b), ()
    if form == 3:
        return f"{who} shares {a * b} {thing}s equally among {a} friends. How many {thing}s does each friend get?", str(b), ()
    return f"One {thing} costs {b} dollars. How many dollars do {a} {thing}s cost?", str(a * b), ()


def _comparison(rng: random.Random) -> Generated:
    a, b = rng.sample(range(1, 100), 2)
    form = rng.randrange(4)
    if form == 0:
        return f"Which number is larger, {a} or {b}?", str(max(a, b)), (str(a), str(b))
    if form == 1:
        return f"Which number is smaller, {a} or {b}?", str(min(a, b)), (str(a), str(b))
    if form == 2:
        relation, holds = rng.choice((("greater", a > b), ("less", a < b)))
        return f"Is {a} {relation} than {b}?", "yes" if holds else "no", ("yes", "no")
    x, y = rng.sample(OBJECTS, 2)
    wa, wb = rng.sample(range(2, 51), 2)
    heavier = rng.random() < 0.5
    pick = x if (wa > wb) == heavier else y
    word = "heavier" if heavier else "lighter"
    return f"A {x} weighs {wa} kilograms and a {y} weighs {wb} kilograms. Which is {word}, the {x} or the {y}?", pick, (x, y)


def _ordering(rng: random.Random) -> Generated:
    comparative, greatest, least = rng.choice(RELATIONS)
    people = rng.sample(NAMES, rng.choice((3, 4)))  # from the greatest to the least
    pairs = [(people[i], people[i + 1]) for i in range(len(people) - 1)]
    rng.shuffle(pairs)
    statements = " ".join(f"{x} is {comparative} than {y}." for x, y in pairs)
    mentioned = tuple(dict.fromkeys(name for pair in pairs for name in pair))
    if rng.random() < 0.5:
        return f"{statements} Who is the {greatest}?", people[0], mentioned
    return f"{statements} Who is the {least}?", people[-1], mentioned


def _syllogism(rng: random.Random) -> Generated:
    pet = rng.choice(PETS)
    # the two valid "yes" forms are listed twice, so that half of the answers are yes
    form = rng.choice(("all", "chain", "all", "chain", "tollens", "exclusion", "converse", "no_converse"))
    if form in ("exclusion", "no_converse") or rng.random() < 0.5:
        small, big, top = rng.sample(NONSENSE, 3)
    else:
        chain = rng.choice(CHAINS)
        i, j = (0, 1) if form == "chain" else sorted(rng.sample(range(3), 2))  # a specific and a general word
        small, big, top = chain[i], chain[j], chain[2]
    ask = rng.choice(("Is {pet} {x}?", "Must {pet} be {x}?"))
    if form == "all":
        premises, query, answer = f"All {small}s are {big}s. {pet} is {_a(small)}.", big, "yes"
    elif form == "chain":
        premises, query, answer = f"All {small}s are {big}s, and all {big}s are {top}s. {pet} is {_a(small)}.", top, "yes"
    elif form == "tollens":
        premises, query, answer = f"All {small}s are {big}s. {pet} is not {_a(big)}.", small, "no"
    elif form == "exclusion":
        premises, query, answer = f"No {small}s are {big}s. {pet} is {_a(small)}.", big, "no"
    elif form == "no_converse":
        premises, query, answer = f"No {small}s are {big}s. {pet} is {_a(big)}.", small, "no"
    else:  # affirming the consequent: being a {big} does not make it a {small}
        premises, query, answer = f"All {small}s are {big}s. {pet} is {_a(big)}.", small, "no"
        ask = "Must {pet} be {x}?"
    return f"{premises} {ask.format(pet=pet, x=_a(query))}", answer, ("yes", "no")


def _sequence(rng: random.Random) -> Generated:
    form = rng.choices(("up", "down", "double"), weights=(4, 3, 3))[0]
    if form == "double":
        start = rng.randint(1, 6)
        terms = [start * 2 ** i for i in range(5)]
    else:
        step = rng.choice((1, 2, 3, 4, 5, 6, 7, 10))
        start = rng.randint(1, 20)
        terms = [start + i * step for i in range(5)]
        if form == "down":
            terms.reverse()
    shown = ", ".join(str(t) for t in terms[:4])
    return f"What number comes next in the sequence {shown}?", str(terms[4]), ()


def _multi_step(rng: random.Random) -> Generated:
    who, other, thing, a, b = _story(rng)
    form = rng.randrange(5)
    if form == 0:
        c = rng.randint(1, a + b - 1)
        return (f"{who} has {a} {_noun(thing, a)}, buys {b} more, and then gives {c} to {other}. "
                f"How many {thing}s does {who} have now?"), str(a + b - c), ()
    if form == 1:
        return f"Start with {a}, add {b}, and then double the result. What number do you get?", str(2 * (a + b)), ()
    if form == 2:
        c = _number(rng)
        return f"What is {a} + {b} + {c}?", str(a + b + c), ()
    a, b, c = rng.randint(2, 6), rng.randint(2, 9), rng.randint(1, 9)
    if form == 3:
        return (f"There are {a} bags with {b} {thing}s in each bag, and {c} more {_noun(thing, c)} on the table. "
                f"How many {thing}s are there altogether?"), str(a * b + c), ()
    return f"What is {a} times {b} plus {c}?", str(a * b + c), ()


GENERATORS: dict[str, Callable[[random.Random], Generated]] = {
    "arithmetic": _arithmetic, "word_problem": _word_problem, "comparison": _comparison, "ordering": _ordering,
    "syllogism": _syllogism, "sequence": _sequence, "multi_step": _multi_step,
}


def probe_suite(seed: int = 0, per_kind: int = 48, *, shots: int = 2) -> list[ProbeItem]:
    """``per_kind`` distinct items of every kind in TASK_KINDS, the same for the same seed.

    Each item's ``shots`` are ``shots`` solved questions of the same kind (small models answer in the
    expected form only after seeing it), the same ones for every item of the kind, so an evaluator
    with a KV cache runs them once per kind; its ``prompt`` is the question alone (the zero-shot form); no item asks a question that is shown solved. Each kind draws from its own ``random.Random`` seeded with
    (seed, kind), so a smaller ``per_kind`` gives a prefix of a larger one.
    """
    for name, value, least in (("per_kind", per_kind, 1), ("shots", shots, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise CpOnnxError(f"{name} must be a whole number >= {least}; got {value!r}")
    return [item for kind in TASK_KINDS for item in _generate(kind, seed, per_kind, shots)]


def _generate(kind: str, seed: int, count: int, shots: int) -> list[ProbeItem]:
    rng = random.Random(f"cp-onnx probes {seed} {kind}")
    make = GENERATORS[kind]
    solved = _demonstrations(kind, rng, shots)
    demonstrations = "".join(f"{PROMPT.format(question=q)} {a}\n\n" for q, a in solved)
    shown = {q for q, _ in solved}
    items: dict[str, ProbeItem] = {}
    for _ in range(100 * count):
        if len(items) == count:
            break
        question, answer, options = make(rng)
        if question not in items and question not in shown:
            items[question] = ProbeItem(f"{kind}-{len(items):03d}", kind, PROMPT.format(question=question),
                                        " " + answer, tuple(" " + o for o in options), demonstrations)
    if len(items) < count:
        raise CpOnnxError(f"only {len(items)} distinct {kind} items could be made; ask for per_kind <= {len(items)}")
    return list(items.values())


def _demonstrations(kind: str, rng: random.Random, shots: int) -> list[tuple[str, str]]:
    """Distinct solved questions, each answer unlike the one before (so yes and no alternate)."""
    solved: list[tuple[str, str]] = []
    for _ in range(100 * shots):
        if len(solved) == shots:
            break
        q, a, _ = GENERATORS[kind](rng)
        if all(q != earlier for earlier, _ in solved) and (not solved or a != solved[-1][1]):
            solved.append((q, a))
    if len(solved) < shots:
        raise CpOnnxError(f"could not find {shots} distinct solved {kind} questions to show; ask for fewer shots")
    return solved


def save_suite(items: Iterable[ProbeItem], path: str | Path) -> Path:
    """Write items as JSONL (id, kind, prompt, answer, options and shots when there are any), atomically.

    Shots that every item of a kind shares are written once, on a ``{"kind", "shots"}`` line before its items."""
    path = Path(path)
    items = list(items)
    shared = {kind: shots.pop() for kind in dict.fromkeys(i.kind for i in items)
              if len(shots := {i.shots for i in items if i.kind == kind}) == 1 and "" not in shots}
    lines, written = [], set()
    for item in items:
        if item.kind in shared and item.kind not in written:
            lines.append(json.dumps({"kind": item.kind, "shots": shared[item.kind]}, ensure_ascii=False) + "\n")
            written.add(item.kind)
        record = {"id": item.id, "kind": item.kind, "prompt": item.prompt, "answer": item.answer}
        if item.options:
            record["options"] = list(item.options)
        if item.shots and item.kind not in shared:
            record["shots"] = item.shots
        lines.append(json.dumps(record, ensure_ascii=False) + "\n")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text(path, "".join(lines))
    except OSError as err:
        raise CpOnnxError(f"cannot write the probe suite to {path} ({err.strerror}); choose another path") from None
    return path


def load_suite(path: str | Path) -> list[ProbeItem]:
    """Items from a JSONL file: kind, prompt, answer, and optionally id, options and shots, one object per line.

    A line with only ``kind`` and ``shots`` gives the shots of every item of that kind without its own
    ``"shots"`` (few-shot regime); items with no shots at all are asked zero-shot only."""
    path = Path(path)
    if not path.is_file():
        raise CpOnnxError(f"no probe suite at {path}; pass an existing .jsonl file with one item per line, like {ITEM_LINE}")
    if path.suffix.lower() != ".jsonl":
        raise CpOnnxError(f"probe suite {path} is not a .jsonl file; write one item per line, like {ITEM_LINE}")
    items: list[ProbeItem] = []
    own_shots: list[bool] = []
    kind_shots: dict[str, tuple[str, int]] = {}
    seen: dict[str, int] = {}
    per_kind: dict[str, int] = {}
    for number, record in iter_jsonl(path, ITEM_LINE, "probe suite"):
        where = f"line {number} of {path}"
        if isinstance(record, dict) and set(record) == {"kind", "shots"}:
            _kind_shots(record, where, kind_shots, number)
            continue
        item = _item_from_record(record, where)
        if not item.id:  # numbered within its kind, as generated suites are
            item = replace(item, id=f"{item.kind}-{per_kind.get(item.kind, 0):03d}")
        if item.id in seen:
            raise CpOnnxError(f"{where} repeats the id '{item.id}' of line {seen[item.id]}; give every item its own id")
        seen[item.id] = number
        per_kind[item.kind] = per_kind.get(item.kind, 0) + 1
        items.append(item)
        own_shots.append("shots" in record)
    if not items:
        raise CpOnnxError(f"no probe items in {path}; the file needs at least one line like {ITEM_LINE}")
    return [item if own or item.kind not in kind_shots else replace(item, shots=kind_shots[item.kind][0]) for item, own in zip(items, own_shots)]


def _kind_shots(record: dict, where: str, kind_shots: dict[str, tuple[str, int]], number: int) -> None:
    """Record a kind's shots line; CpOnnxError for a bad one or a second line for the same kind."""
    kind, shots = record["kind"], record["shots"]
    if not isinstance(kind, str) or not kind.strip() or not isinstance(shots, str) or not shots:
        raise CpOnnxError(f'{where} gives a kind\'s shots, but "kind" and "shots" must be non-empty strings, like {KIND_SHOTS_LINE}')
    if kind in kind_shots:
        raise CpOnnxError(f"{where} gives the shots of kind '{kind}' again (line {kind_shots[kind][1]} gave them); keep one line per kind")
    kind_shots[kind] = (shots, number)


def _item_from_record(record: dict, where: str) -> ProbeItem:
    for field in ("kind", "prompt", "answer"):
        value = record.get(field)
        if not isinstance(value, str) or not value.strip():
            raise CpOnnxError(f'{where} has no non-empty "{field}" string; every line needs kind, prompt and answer, like {ITEM_LINE}')
    options = record.get("options", [])
    if not isinstance(options, list) or not all(isinstance(o, str) for o in options):
        raise CpOnnxError(f'{where} has "options" that are not a list of strings; write them like ["yes", "no"] with the answer among them')
    if len(options) > MAX_PROBE_OPTIONS:
        raise CpOnnxError(f"{where} has {len(options):,} options, more than {MAX_PROBE_OPTIONS}; a probe item's options are its few candidate answers")
    if options and record["answer"] not in options:
        raise CpOnnxError(f'{where} has options {options} without its answer {record["answer"]!r}; add the answer to the options, spelled the same way')
    item_id = record.get("id", "")
    if not isinstance(item_id, str) or ("id" in record and not item_id):
        raise CpOnnxError(f'{where} has an "id" that is not a non-empty string; use a string such as "arithmetic-007" or leave it out')
    shots = record.get("shots", "")
    if not isinstance(shots, str):
        raise CpOnnxError(f'{where} has "shots" that are not a string; give the solved examples shown before the prompt as one string, or "" for none')
    return ProbeItem(item_id, record["kind"], record["prompt"], record["answer"], tuple(options), shots)


def general_texts() -> list[str]:
    """The shipped general-text paragraphs on which perplexity measures what a change costs."""
    return read_texts(DATA_DIR / "general" / "perplexity_en.jsonl")


def _noun(thing: str, count: int) -> str:
    return thing if count == 1 else f"{thing}s"


def _a(noun: str) -> str:
    return f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}"
