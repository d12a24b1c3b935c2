"""Every console script of setup.py answers `--help` in a real process: exit 0, a usage text, no traceback.
(argparse %-formats help strings: a bare `%` in a field docstring used to crash `relora-train --help`.)"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO


def console_scripts() -> list[str]:
    """The names of setup.py's entry_points["console_scripts"], read from its source (not imported)."""
    tree = ast.parse((REPO / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values):
                if isinstance(key, ast.Constant) and key.value == "console_scripts":
                    return [spec.split("=", 1)[0].strip() for spec in ast.literal_eval(value)]
    raise AssertionError("setup.py lists no entry_points console_scripts")


SCRIPTS = console_scripts()


def test_setup_py_lists_the_scripts():
    assert "relora-train" in SCRIPTS and "relora-export" in SCRIPTS


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_works(name):
    script = Path(sys.executable).parent / name
    if not script.is_file():
        pytest.skip(f"{name} is not installed next to {sys.executable} (pip install -e . installs the console scripts)")
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0, (name, result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, (name, result.stderr[-2000:])
    assert result.stdout.strip() and "usage" in result.stdout.lower(), (name, result.stdout[:500])
