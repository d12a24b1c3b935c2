"""Training methods behind the `Method` interface (`base.py`) and its registry: a family is one package here
(`relora/`, `switchlora/`, `galore/`) or, beside its architecture, one module (`cola.py`, `crnet.py`).

Importing this package registers the built-in methods and every other package found here: a new method is one
folder with a `@register_method` class (or a package anywhere, imported by the launcher of a plug-in).
"""

import importlib
import pkgutil

from .base import Event, Method, build_method, method_class, method_names, method_sections, register_method

# isort: off  (registration order is --method's order)
from . import full, relora, cola, crnet, galore, switchlora  # noqa: E402,F401
# isort: on

# A method family added as one more package here registers itself: imported after the built-ins, by name.
for _package in sorted(pkgutil.iter_modules(__path__), key=lambda found: found.name):
    if _package.ispkg and _package.name not in ("relora", "galore", "switchlora"):
        importlib.import_module(f"{__name__}.{_package.name}")

__all__ = ["Event", "Method", "build_method", "method_class", "method_names", "method_sections", "register_method"]
