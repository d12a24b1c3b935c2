"""DeepSpeed ZeRO 0-3 behind the `Backend` interface (registry name `deepspeed`).

| module | job |
|---|---|
| `backend.py` | `DeepSpeedBackend`: setup, step, save/load, rebuilds |
| `engine_config.py` | the DeepSpeed JSON a run uses: parsed, checked, filled from the run's batch shape and dtype |
| `checkpoint.py` | the engine's checkpoint files read back (weights_only) and the model for `relora-export` |
| `layout.py` | where each parameter's elements and fp32 masters live: the `TensorAccess` of each stage |
| `fp32_copies.py` | fp32 copies of frozen parameters a method writes, when DeepSpeed holds them in bf16 |
| `portable_state.py` | optimizer state kept per model parameter, for resumes at another world size |

Nothing here imports deepspeed at module level: the package is imported by the registry only when chosen.
"""
