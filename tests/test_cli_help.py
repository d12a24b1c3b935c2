"""Every console script of setup.py answers `--help`: exit 0, a usage text, no traceback. (argparse %-formats help
strings: a bare `%` in a field docstring used to crash `relora-train --help`.) One real process runs every entry
point in turn, as its console script would (sys.argv = [name, "--help"]): one interpreter start and one import of
relora_dist instead of one per script."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, launch_env

pytestmark = pytest.mark.dist

RUN_EACH = """
import contextlib, importlib, io, json, sys, traceback
results = {}
for name, target in json.loads(sys.argv[1]).items():
    module, _, function = target.partition(":")
    out, err = io.StringIO(), io.StringIO()
    sys.argv = [name, "--help"]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = getattr(importlib.import_module(module), function)()
        except SystemExit as e:
            code = e.code
        except BaseException:
            code, _ = "raised", traceback.print_exc()
    results[name] = {"code": code or 0, "stdout": out.getvalue(), "stderr": err.getvalue()}
print(json.dumps(results))
"""


def console_scripts() -> dict[str, str]:
    """setup.py's entry_points["console_scripts"] as {name: "module:function"}, read from its source (not imported)."""
    tree = ast.parse((REPO / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values):
                if isinstance(key, ast.Constant) and key.value == "console_scripts":
                    specs = [spec.split("=", 1) for spec in ast.literal_eval(value)]
                    return {name.strip(): target.strip() for name, target in specs}
    raise AssertionError("setup.py lists no entry_points console_scripts")


def test_every_console_script_answers_help():
    scripts = console_scripts()
    assert {"relora-train", "relora-export", "relora-data"} <= set(scripts)
    installed = Path(sys.executable).parent
    missing = [name for name in scripts if not (installed / name).is_file()]
    assert not missing, f"not installed next to {sys.executable}: {missing} (pip install -e . installs them)"
    result = subprocess.run([sys.executable, "-c", RUN_EACH, json.dumps(scripts)], capture_output=True, text=True,
                            timeout=300, cwd=REPO, env=launch_env())
    assert result.returncode == 0, result.stderr[-3000:]
    for name, r in json.loads(result.stdout.strip().splitlines()[-1]).items():
        assert r["code"] == 0, (name, r["code"], r["stderr"][-2000:])
        assert "Traceback" not in r["stderr"], (name, r["stderr"][-2000:])
        assert r["stdout"].strip() and "usage" in r["stdout"].lower(), (name, r["stdout"][:500])
