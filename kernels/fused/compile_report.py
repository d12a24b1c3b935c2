"""Compile every shipped kernel config for sm_80 and sm_90 without a GPU and report registers, spills and
shared memory (triton bundles ptxas and cuobjdump). Run as a module, never under TRITON_INTERPRET:

    python -m relora_dist.kernels.compile_report [--main-only] [--json benchmarks/results/kernel_compile.json]

Arguments are specialised as the JIT would for contiguous bf16 tensors: unit inner strides become constants,
other ints and pointers carry divisibility-by-16 hints (without them the GEMMs lose cp.async and spill).
Exit status 1 when a main config (the first of each table, what a GPU tries first) spills.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"  # real JIT functions, not the interpreter's
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from . import relora_kernels as K  # noqa: E402
from .configs import DOWN, DSDB, DX, MAIN, SHARED_LIMIT, Tiles  # noqa: E402

UNIT_STRIDES = {
    "down": ("stride_xk", "stride_ak"),
    "main": ("stride_xk", "stride_wk", "stride_br"),
    "dsdb": ("stride_dyn", "stride_br"),
    "dx": ("stride_dyn", "stride_wk", "stride_ak", "stride_xk"),
}
FP32_POINTERS = {"dsdb": ("dt_ptr", "db_ptr"), "dx": ("da_ptr",)}
KERNELS = {"down": (K._lora_down, DOWN), "main": (K._lora_main, MAIN), "dsdb": (K._lora_dsdb, DSDB), "dx": (K._lora_dx, DX)}
FLOAT_SCALARS = ("scale", "p")


def _source(name: str, tiles: Tiles, r_block: int) -> ASTSource:
    fn, _ = KERNELS[name]
    constants = {s: 1 for s in UNIT_STRIDES[name]}
    flags = {"DROPOUT": True, "COMPUTE_DX": True, "HAS_BIAS": True, "UPCAST": False, "PRECISION": "ieee", "GROUP_M": 8,
             "BR": r_block, "BM": tiles.BM, "BN": tiles.BN, "BK": tiles.BK}
    constants.update({k: v for k, v in flags.items() if k in fn.arg_names})
    signature, attrs = {}, {}
    for i, arg in enumerate(fn.arg_names):
        if arg in constants:
            signature[arg] = "constexpr"
        elif arg.endswith("_ptr"):
            signature[arg] = "*fp32" if arg in FP32_POINTERS.get(name, ()) else "*bf16"
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif arg in FLOAT_SCALARS:
            signature[arg] = "fp32"
        else:
            signature[arg] = "i32"
            if arg != "seed":
                attrs[(i,)] = [["tt.divisibility", 16]]
    return ASTSource(fn=fn, signature=signature, constexprs=constants, attrs=attrs)


def _resources(cubin: bytes) -> tuple[int, int]:
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True, check=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+)", out)
    return int(found.group(1)), int(found.group(2))


def compile_one(name: str, arch: int, tiles: Tiles, r_block: int = 64) -> dict:
    compiled = triton.compile(_source(name, tiles, r_block), target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": tiles.num_warps, "num_stages": tiles.num_stages})
    regs, stack = _resources(compiled.asm["cubin"])
    return {"kernel": name, "arch": f"sm_{arch}", "BM": tiles.BM, "BN": tiles.BN, "BK": tiles.BK, "BR": r_block,
            "num_warps": tiles.num_warps, "num_stages": tiles.num_stages, "registers": regs, "spill_bytes": stack,
            "shared_bytes": compiled.metadata.shared, "shared_limit": SHARED_LIMIT[arch]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--main-only", action="store_true", help="only the first config of each table")
    parser.add_argument("--json", help="write the rows to this file")
    args = parser.parse_args(argv)
    rows = []
    for name, (_, table) in KERNELS.items():
        for arch, configs in sorted(table.items()):
            for index, tiles in enumerate(configs[:1] if args.main_only else configs):
                row = compile_one(name, arch, tiles)
                row["main"] = index == 0
                rows.append(row)
                print(f"{name:>5} {row['arch']} {tiles.BM:>3}x{tiles.BN:>3}x{tiles.BK:>3} w{tiles.num_warps} s{tiles.num_stages}"
                      f"{' (main)' if row['main'] else '       '}: {row['registers']:3d} regs, {row['spill_bytes']:5d} B spilled,"
                      f" {row['shared_bytes']:6d} B shared (limit {row['shared_limit']})", flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"triton": triton.__version__, "rows": rows}, indent=1))
    bad = [r for r in rows if r["main"] and (r["spill_bytes"] > 0 or r["shared_bytes"] > r["shared_limit"])]
    for r in bad:
        print(f"FAIL {r['kernel']} {r['arch']} main config spills {r['spill_bytes']} B or exceeds shared memory", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
