"""Training methods behind the `Method` interface (`base.py`) and its registry: a family is one package here
(`relora/`, `switchlora/`, `galore/`) or, beside its architecture, one module (`cola.py`, `crnet.py`).

Importing this package registers the built-in methods; a new method is one package (or module) with a
`@register_method` class, imported here or by the launcher of a plug-in.
"""

from .base import Event, Method, build_method, method_class, method_names, method_sections, register_method

# isort: off  (registration order is --method's order)
from . import full, relora, cola, crnet, galore, switchlora  # noqa: E402,F401
# isort: on

__all__ = ["Event", "Method", "build_method", "method_class", "method_names", "method_sections", "register_method"]
