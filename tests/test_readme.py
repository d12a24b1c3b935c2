"""The README's config reference matches the dataclasses, and its first two commands are the scripts CI and users run."""

from pathlib import Path

from relora_dist.train.arguments import config_reference_markdown

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_config_reference_is_current():
    assert config_reference_markdown() in README


def test_first_two_commands_are_quickstart_and_tests():
    block = README.split("```bash", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].strip() for line in block.strip().splitlines()]
    assert commands[:2] == ["bash launch/quickstart.sh", "bash launch/test.sh"]
    ci = (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text()
    assert "bash launch/test.sh" in ci
