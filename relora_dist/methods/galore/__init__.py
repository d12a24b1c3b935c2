"""GaLore and Fira (`galore:` config section): the methods and their projected AdamW, on whole matrices, DTensor
row shards and flat partitions. Importing it registers both methods."""

from . import method  # noqa: F401  (registration)
