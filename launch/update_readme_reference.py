"""Rewrite the config reference table in README.md from the dataclasses (tests/test_readme.py checks it)."""

import re
from pathlib import Path

from relora_dist.train.arguments import config_reference_markdown

readme = Path(__file__).resolve().parents[1] / "README.md"
text = readme.read_text()
table = re.compile(r"\| YAML key \| flag \| default \| meaning \|\n(?:\|.*\|\n)+")
readme.write_text(table.sub(lambda _: config_reference_markdown(), text, count=1))
print(f"updated {readme}")
