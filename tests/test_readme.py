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


def test_readme_shows_the_decision_analyze_prints_first():
    """The README's SmolLM2 printout opens with the decision line, formatted as the code formats it, for the prediction
    the SmolLM2 benchmark recorded (recorded before `regime` named the few-shot regime so; the method measured the same)."""
    import json
    import textwrap

    from cp_onnx.analysis import predict
    from cp_onnx.outputs.decision import decision_line
    from cp_onnx.outputs.summary import RANKINGS_NOTE, WIDTH

    readme = (ROOT / "README.md").read_text()
    section = readme.split("## What `cp-onnx analyze` prints on the default model", 1)[1].split("\n## ", 1)[0]
    shown = re.search(r"```\n(.+?)\n```", section, flags=re.S).group(1)
    recorded = json.loads((ROOT / "benchmarks" / "results" / "predictions_smollm2_few_shot_v1.json").read_text())["prediction"]
    few_shot = predict.REGIMES[predict.FEW_SHOT]  # the default regime, as the code now names it
    prediction = recorded | {"regime": predict.FEW_SHOT, "metric": few_shot.metric, "gain_per": few_shot.per}
    assert shown.split("\n\n")[0] == textwrap.fill(decision_line({"prediction": prediction}), WIDTH, subsequent_indent="  ",
                                                   break_on_hyphens=False)
    assert RANKINGS_NOTE in shown.splitlines()
