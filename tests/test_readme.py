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


def test_library_snippet_runs_and_merges():
    """The README's library example, on a tiny LLaMA and random batches."""
    import torch

    from relora_dist.models import build_model, llama_config_from_shape

    snippet = README.split("## Library", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    torch.manual_seed(0)
    total_steps = 45
    model = build_model(llama_config_from_shape(32, 88, 2, 2, vocab_size=50, max_positions=32))
    tokens = torch.randint(0, 50, (total_steps, 2, 16))
    loader = [{"input_ids": x, "labels": x} for x in tokens]
    scope = {"model": model, "loader": loader, "total_steps": total_steps}
    exec(compile(snippet, "README.md", "exec"), scope)
    assert scope["ctl"].merges == 2 and scope["ctl"].resets == 2
    assert all(layer.lora_B.abs().sum() > 0 for layer in scope["rd"].relora_layers(model))
