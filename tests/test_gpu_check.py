"""launch/gpu_check.sh on a CPU: it refuses in one line, and everything it would do on a GPU but the GPU calls
is checked here (every planned training run passes preflight, targets read the right row, a broken step fails)."""

import json
import subprocess
import sys

import pytest

from conftest import REPO
from relora_dist.benchmarks import gpu_check
from relora_dist.train.arguments import parse_run_config
from relora_dist.train.preflight import preflight


@pytest.mark.dist
def test_without_a_gpu_it_refuses_in_one_line():
    env = {"VENV": sys.prefix, "PATH": "/usr/bin:/bin"}
    out = subprocess.run(["bash", str(REPO / "launch" / "gpu_check.sh")], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 2 and out.stdout == ""
    assert len(out.stderr.strip().splitlines()) == 1 and "no CUDA GPU" in out.stderr


def test_every_planned_run_passes_preflight(capsys, tmp_path):
    assert gpu_check.main(["--plan", "--out", str(tmp_path)]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert len(plan) == 16 and {"ddp/eager/fused-off", "zero3/compile/fused-on", "fsdp2/compile/fused-off"} <= set(plan)
    for name, args in plan.items():
        cfg, _ = parse_run_config(args)
        run = preflight(cfg, world_size=1)
        assert run.method.phases() == [(0, 10), (10, 30)], name
        assert cfg.train.compile == ("/compile/" in name) and cfg.relora.fused_kernels == name.rsplit("-", 1)[1]


def _kernels(fused_fwd, dense_fwd, fused_both, peft_both):
    row = {"K": 4096, "N": 4096, "r": 64, "fused_fwd_ms": fused_fwd, "dense_fwd_ms": dense_fwd,
           "fused_fwd_bwd_ms": fused_both, "peft_fwd_bwd_ms": peft_both}
    return {"measured": [dict(row, r=128, fused_fwd_ms=99.0), row]}


def test_kernel_targets_read_the_d4096_r64_row():
    met, missed = gpu_check.kernel_targets(_kernels(1.05, 1.0, 0.7, 1.0))
    assert met["met"] and met["value"] == pytest.approx(1.05) and missed["met"] and missed["value"] == pytest.approx(0.7)
    slow = gpu_check.kernel_targets(_kernels(1.2, 1.0, 0.9, 1.0))
    assert [t["met"] for t in slow] == [False, False]
    with pytest.raises(ValueError, match="4096"):
        gpu_check.kernel_targets({"measured": []})


@pytest.mark.dist
def test_a_broken_step_fails_loudly_with_its_output():
    check, _ = gpu_check.run_step("broken", [sys.executable, "-c", "print('the reason'); raise SystemExit(3)"], timeout_s=60)
    assert not check.ok and "exit 3" in check.error and "the reason" in check.error
    slow, _ = gpu_check.run_step("slow", [sys.executable, "-c", "import time; time.sleep(30)"], timeout_s=1)
    assert not slow.ok and "timed out" in slow.error
    report = {"device": "test", "seconds": 1.0, "budget_s": 480.0, "ok": False, "targets": [],
              "checks": [vars(check), vars(slow), vars(gpu_check.Check("fine", True, 2.0))]}
    text = gpu_check.summarize(report)
    assert text.splitlines()[0].endswith("FAIL") and "FAIL broken" in text and "ok   fine" in text
