"""The README's two set-up commands are the ones the project actually runs."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _setup_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Set up on a fresh machine", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", section, flags=re.S)


def test_readme_has_exactly_two_setup_commands():
    commands = _setup_commands()
    assert len(commands) == 2 and all("\n" not in c for c in commands)
    assert commands[0].endswith("cp-onnx analyze")


def test_ci_runs_the_readme_test_command():
    ci_lines = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.startswith("python3 -m venv")]
    assert ci_lines == [_setup_commands()[1]]


def test_every_readme_subcommand_exists():
    from cp_onnx.cli import build_parser

    readme = (ROOT / "README.md").read_text()
    documented = set(re.findall(r"`cp-onnx ([\w-]+)", readme))
    choices = build_parser()._subparsers._group_actions[0].choices
    assert documented and documented <= set(choices)


def test_readme_shows_what_analyze_prints_first():
    """The README's SmolLM2 printout is the summary of the committed report of `cp-onnx analyze` on SmolLM2 (both
    decisions, then the zero-shot greedy line), as the code formats it."""
    import json

    from cp_onnx.outputs.summary import format_summary

    readme = (ROOT / "README.md").read_text()
    section = readme.split("## What `cp-onnx analyze` prints on the default model", 1)[1].split("\n## ", 1)[0]
    shown = re.search(r"```\n(.+?)\n```", section, flags=re.S).group(1)
    report = json.loads((ROOT / "benchmarks" / "results" / "report_smollm2.json").read_text())
    printed = format_summary(report).split("\n\n")
    assert shown.split("\n\n")[:2] == printed[:2]  # the two decisions, then the first greedy line
    assert list(report["predictions"]) == ["zero_shot", "few_shot"]
    assert report["predictions"]["zero_shot"]["decision"] == "help" and report["predictions"]["few_shot"]["decision"] == "abstain"


def test_readme_line_count():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200