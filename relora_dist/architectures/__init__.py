"""Model architectures other than HF LLaMA that methods build (registered with transformers' Auto classes on import,
so their exports load with `AutoModelForCausalLM.from_pretrained`)."""

from . import cola, crnet  # noqa: F401  (registration)
