"""Training methods, one module each, behind the `Method` interface (`base.py`) and its registry.

Importing this package registers the built-in methods; a new method is one module with a
`@register_method` class (imported here, or by the launcher of a plug-in).
"""

from .base import Event, Method, build_method, method_class, method_names, method_sections, register_method
from . import full, control, lora, relora, cola, crnet, galore, switchlora  # noqa: E402,F401  (registration, in --method order)

__all__ = ["Event", "Method", "build_method", "method_class", "method_names", "method_sections", "register_method"]
