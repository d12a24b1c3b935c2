"""Command-line flags generated from the RunConfig dataclasses (field docstrings become help)."""

from __future__ import annotations

import argparse
import ast
import functools
import inspect
from dataclasses import fields
from pathlib import Path

from .config import SECTIONS, RunConfig, flag_for


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The string literal under each field of a dataclass (torchtitan/tyro style)."""
    try:
        body = ast.parse(inspect.getsource(cls)).body[0].body
    except (OSError, TypeError):
        return {}
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def _bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _converter(annotation: str):
    base = annotation.replace(" | None", "").strip()
    if base.startswith("tuple"):
        convert = lambda text: tuple(s.strip() for s in text.split(",") if s.strip())  # noqa: E731
    else:
        convert = {"int": int, "float": float, "bool": _bool}.get(base, str)
    if "None" not in annotation:
        return convert

    def optional(text: str):
        return None if text.lower() in ("", "none", "null") else convert(text)

    optional.__name__ = base  # argparse names the type in "invalid X value"
    return optional


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, no usage dump
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser(prog: str = "relora-train") -> argparse.ArgumentParser:
    parser = _Parser(prog=prog, description="ReLoRA / full-rank / LoRA pre-training of LLaMA models.",
                     argument_default=argparse.SUPPRESS)
    parser.add_argument("--config", help="YAML file with sections model, data, optim, train, relora.")
    parser.add_argument("--dry-run", action="store_true", help="Print the resolved config and exit.")
    # The deepspeed launcher appends --local_rank=N; ranks come from the environment instead.
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    default = RunConfig()
    for section in SECTIONS:
        cls = type(getattr(default, section))
        group = parser.add_argument_group(section)
        docs = field_docs(cls)
        for f in fields(cls):
            flag = flag_for(section, f.name)
            if flag is None:
                continue
            kwargs = dict(dest=f"{section}.{f.name}", help=docs.get(f.name, ""))
            if f.name == "resume":
                kwargs.update(nargs="?", const="latest", metavar="CKPT")
            else:
                kwargs.update(type=_converter(str(f.type)), metavar=f.name.upper())
            group.add_argument(f"--{flag}", **kwargs)
    return parser


def parse_run_config(argv: list[str] | None = None, prog: str = "relora-train") -> tuple[RunConfig, argparse.Namespace]:
    """defaults < YAML < flags. Raises ValueError for bad values; argparse exits 2 for bad flags."""
    args = build_parser(prog).parse_args(argv)
    tree: dict = {}
    if getattr(args, "config", None):
        tree = load_yaml(args.config)
    for dest, value in vars(args).items():
        if "." in dest:
            section, name = dest.split(".", 1)
            tree.setdefault(section, {})
            tree[section] = dict(tree[section] or {}) | {name: value}
    cfg = RunConfig.from_dict(tree)
    cfg.validate()
    return cfg, args


def load_yaml(path: str) -> dict:
    import yaml

    file = Path(path)
    if not file.is_file():
        raise ValueError(f"config file not found: {path} (--config)")
    try:
        tree = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(tree, dict):
        raise ValueError(f"config file {path} must hold a mapping of sections")
    return tree


def config_reference_markdown() -> str:
    """The README's config reference: YAML key, flag, default and help of every field."""
    rows = ["| YAML key | flag | default | meaning |", "|---|---|---|---|"]
    default = RunConfig()
    for section in SECTIONS:
        obj = getattr(default, section)
        docs = field_docs(type(obj))
        for f in fields(obj):
            flag = flag_for(section, f.name)
            value = getattr(obj, f.name)
            if isinstance(value, tuple):
                value = ",".join(value)
            rows.append(f"| `{section}.{f.name}` | {f'`--{flag}`' if flag else '(from `--seed`)'} | `{value}` | {docs.get(f.name, '')} |")
    return "\n".join(rows) + "\n"
