"""SwitchLoRA (`switchlora:` config section): the method, its layer with candidate pools, the switch on the access
layer and its optimizer. Importing it registers the method."""

from . import method  # noqa: F401  (registration)
