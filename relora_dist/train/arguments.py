"""Command-line flags generated from the run-config sections (field docstrings become help)."""

from __future__ import annotations

import argparse
import ast
import functools
import inspect
from dataclasses import fields
from pathlib import Path

from ..backends import BACKENDS
from ..methods import method_class, method_names, method_sections
from .config import SHARED_METHOD_FIELDS, RunConfig, flag_for, section_specs


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


class _Switch(argparse.Action):
    """A boolean flag: `--x` / `--no-x` as bare switches, and `--x true|false` as before."""

    def __init__(self, option_strings, dest, **kwargs):
        flags = list(option_strings) + [f"--no-{s[2:]}" for s in option_strings if s.startswith("--")]
        kwargs.pop("type", None)
        super().__init__(flags, dest, nargs="?", metavar="BOOL", **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        if option_string.startswith("--no-"):
            if values is not None:
                parser.error(f"{option_string} takes no value")
            setattr(namespace, self.dest, False)
        else:
            try:
                setattr(namespace, self.dest, True if values is None else _bool(values))
            except argparse.ArgumentTypeError as e:
                parser.error(f"argument {option_string}: {e}")

    def format_usage(self):
        return " | ".join(self.option_strings)


def _converter(annotation: str):
    base = annotation.replace(" | None", "").strip()
    if base.startswith("tuple"):
        convert = lambda text: tuple(s.strip() for s in text.split(",") if s.strip())  # noqa: E731
    else:
        convert = {"int": int, "float": float}.get(base, str)
    if "None" not in annotation:
        return convert

    def optional(text: str):
        return None if text.lower() in ("", "none", "null") else convert(text)

    optional.__name__ = base  # argparse names the type in "invalid X value"
    return optional


def _one_of(kind: str, names: tuple[str, ...], flag: str):
    def convert(text: str) -> str:
        if text not in names:
            raise argparse.ArgumentTypeError(f"unknown {kind} {text!r}; choose one of {', '.join(names)} ({flag})")
        return text

    convert.__name__ = kind
    return convert


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, no usage dump
        self.exit(2, f"{self.prog}: error: {message}\n")


def _help_text(text: str) -> str:
    """Docstring text as an argparse help string: argparse %-formats help (`%(default)s`), so a literal `%`
    must reach it as `%%` (the README's config reference prints the docstring as written)."""
    return text.replace("%", "%%")


def _is_bool(annotation: str) -> bool:
    return annotation.replace(" | None", "").strip() == "bool"


def build_parser(prog: str = "relora-train") -> argparse.ArgumentParser:
    parser = _Parser(prog=prog, description="Low-rank and full-rank pre-training of LLaMA models (--method).",
                     argument_default=argparse.SUPPRESS)
    parser.add_argument("--config", help="YAML file with one section per top-level key (see the README's config reference).")
    parser.add_argument("--dry-run", action="store_true", help="Validate everything the run would, print the resolved config and exit.")
    # The deepspeed launcher appends --local_rank=N; ranks come from the environment instead.
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    shared_done: set[str] = set()
    for section, (cls, defaults) in section_specs().items():
        _add_section_flags(parser, section, cls, shared_done)
    return parser


def add_method_flags(parser: argparse.ArgumentParser, optim_fields: tuple[str, ...] = ()) -> None:
    """Every method section's flags as relora-train names them (--rank, --merge-every, --galore-update-gap, ...),
    and the optim section's `optim_fields`, for a script of its own (examples/hf_trainer.py); `method_settings` reads
    them back. Values given are kept, others left out (argument_default=SUPPRESS)."""
    shared_done: set[str] = set()
    _add_section_flags(parser, "optim", section_specs()["optim"][0], shared_done, only=optim_fields)
    for section, (cls, _) in method_sections().items():
        _add_section_flags(parser, section, cls, shared_done)


def method_settings(args: argparse.Namespace, method: str) -> dict:
    """The fields `add_method_flags` set for `method`: its own section's (the shared --rank included) and the optim
    fields, as one mapping (relora_dist.integrations.transformers' method_settings). Flags of other methods'
    sections are left out, as relora-train leaves them unread."""
    own = method_class(method).config_section
    out = {}
    for dest, value in vars(args).items():
        section, _, name = dest.partition(".")
        if not name:
            continue
        if section == "method":
            section = _section_with(name, method)
        if section in ("optim", own):
            out[name] = value
    return out


def _add_section_flags(parser, section: str, cls: type, shared_done: set[str], only: tuple[str, ...] | None = None) -> None:
    group = parser.add_argument_group(section)
    docs = field_docs(cls)
    for f in fields(cls):
        flag = flag_for(section, f.name)
        if only is not None and f.name not in only:
            continue
        if flag is None or (section in method_sections() and f.name in shared_done):
            continue
        dest = f"{section}.{f.name}"
        if section in method_sections() and f.name in SHARED_METHOD_FIELDS:
            shared_done.add(f.name)
            dest = f"method.{f.name}"  # routed to the section of the method in use
        kwargs = dict(dest=dest, help=docs.get(f.name, ""))
        if f.name == "resume":
            kwargs.update(nargs="?", const="latest", metavar="CKPT")
        elif _is_bool(str(f.type)):
            kwargs.update(action=_Switch)
        elif (section, f.name) == ("train", "method"):
            kwargs.update(type=_one_of("method", method_names(), "--method"), metavar="{" + ",".join(method_names()) + "}",
                          help="; ".join(f"{n}: {method_class(n).description}" for n in method_names()) + ".")
        elif (section, f.name) == ("train", "backend"):
            kwargs.update(type=_one_of("backend", BACKENDS, "--backend"), metavar="{" + ",".join(BACKENDS) + "}")
        else:
            kwargs.update(type=_converter(str(f.type)), metavar=f.name.upper())
        kwargs["help"] = _help_text(kwargs["help"])
        group.add_argument(f"--{flag}", **kwargs)


def parse_run_config(argv: list[str] | None = None, prog: str = "relora-train") -> tuple[RunConfig, argparse.Namespace]:
    """defaults < YAML < flags. Raises ValueError for values a section refuses; argparse exits 2 for bad flags.
    Everything else is checked by `train.preflight.preflight` (the run and --dry-run call it)."""
    args = build_parser(prog).parse_args(argv)
    tree: dict = {}
    if getattr(args, "config", None):
        tree = load_yaml(args.config)
    flags = {dest: value for dest, value in vars(args).items() if "." in dest}
    method = flags.get("train.method", (tree.get("train") or {}).get("method", "relora"))
    for dest, value in flags.items():
        section, name = dest.split(".", 1)
        if section == "method":
            section = _section_with(name, method)
        tree.setdefault(section, {})
        tree[section] = dict(tree[section] or {}) | {name: value}
    return RunConfig.from_dict(tree), args


def _section_with(name: str, method: str) -> str:
    """The config section a shared method flag sets: the method's own, else the first section that has it."""
    sections = method_sections()
    try:
        own = method_class(method).config_section
    except ValueError:
        own = None  # reported by validation
    if own in sections and name in {f.name for f in fields(sections[own][0])}:
        return own
    return next(s for s, (cls, _) in sections.items() if name in {f.name for f in fields(cls)})


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
    for section in default.sections:
        obj = getattr(default, section)
        docs = field_docs(type(obj))
        for f in fields(obj):
            flag = flag_for(section, f.name)
            value = getattr(obj, f.name)
            if isinstance(value, tuple):
                value = ",".join(value)
            rows.append(f"| `{section}.{f.name}` | {f'`--{flag}`' if flag else '(from `--seed`)'} | `{value}` | {docs.get(f.name, '')} |")
    return "\n".join(rows) + "\n"
