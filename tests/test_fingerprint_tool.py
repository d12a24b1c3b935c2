"""launch/numerics_fingerprint.py fingerprints every registered method as itself."""

import importlib.util
from pathlib import Path

from conftest import REPO
from relora_dist.methods import method_names
from relora_dist.train.arguments import parse_run_config


def _tool():
    spec = importlib.util.spec_from_file_location("numerics_fingerprint", REPO / "launch" / "numerics_fingerprint.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_registered_method_is_fingerprinted_as_itself():
    tool = _tool()
    assert set(tool.METHOD_ARGS) == set(method_names())
    for method in tool.METHOD_ARGS:
        args = tool.run_arguments(method, "single", Path("/tmp/x"), [])
        assert parse_run_config(args)[0].train.method == method
