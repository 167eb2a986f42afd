"""Command line for the scripts: a dataclass of hyperparameters becomes flags.

Each script declares its hyperparameters once, in a `@dataclass Config` at the
top of the file with a trailing comment per field. `parse_config(Config)` turns
every field into a flag (`lr` -> `--lr`, `max_steps` -> `--max-steps`) whose
help text is that comment, so `--help` always matches the file.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import re
import sys
from pathlib import Path
from typing import Any, Callable


class UsageError(SystemExit):
    """A one-line error for the user: bad flag values, missing inputs.

    It is a SystemExit, so a script that raises it prints the message and exits
    with status 2 without a traceback; tests can catch it like any exception.
    """

    def __init__(self, message: str):
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return self.message


def fail(message: str) -> UsageError:
    """Build the error to raise: `raise fail("...")`."""
    return UsageError(message)


def run_main(main: Callable[[Any], Any], config_cls: type, argv: list[str] | None = None) -> None:
    """Parse flags into `config_cls`, run `main(cfg)`, and turn a UsageError or
    Ctrl-C into one line on stderr instead of a traceback."""
    try:
        cfg = parse_config(config_cls, argv)
        main(cfg)
    except UsageError as e:
        print(f"error: {e.message}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def _field_comments(cls: type) -> dict[str, str]:
    """The trailing `# comment` of each field in the class source, as help text."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    comments = {}
    for line in source.splitlines():
        m = re.match(r"\s+(\w+)\s*:[^#]*#\s*(.*)$", line)
        if m:
            comments[m.group(1)] = m.group(2).strip()
    return comments


def _parse_bool(text: str) -> bool:
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def build_parser(config_cls: type) -> argparse.ArgumentParser:
    doc = inspect.getmodule(config_cls).__doc__ or ""
    parser = argparse.ArgumentParser(
        description=doc.strip().splitlines()[0] if doc.strip() else None,
        epilog=doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", type=Path, default=None,
                        help="JSON file of one object of overrides, e.g. {\"epochs\": 2, \"batch_size\": 50} "
                             "(the flags' names with _ for -); flags given here win over it")
    comments = _field_comments(config_cls)
    hints = {f.name: f.type for f in dataclasses.fields(config_cls)}
    for f in dataclasses.fields(config_cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        flag = "--" + f.name.replace("_", "-")
        help_text = comments.get(f.name, "")
        help_text = f"{help_text} (default: {default})" if help_text else f"(default: {default})"
        kind = hints[f.name] if not isinstance(hints[f.name], str) else None
        if isinstance(default, bool) or kind is bool or hints[f.name] == "bool":
            parser.add_argument(flag, dest=f.name, type=_parse_bool, nargs="?", const=True,
                                default=None, metavar="BOOL", help=help_text)
        elif default is None:
            parser.add_argument(flag, dest=f.name, type=str, default=None, help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, type=type(default), default=None, help=help_text)
    return parser


def parse_config(config_cls: type, argv: list[str] | None = None):
    """Defaults from the dataclass, then a `--config` JSON file, then flags."""
    parser = build_parser(config_cls)
    args = parser.parse_args(argv)
    values: dict[str, Any] = {}
    if args.config is not None:
        try:
            values.update(json.loads(args.config.read_text()))
        except (OSError, ValueError) as e:
            raise fail(f"cannot read --config {args.config}: {e}")
        names = {f.name for f in dataclasses.fields(config_cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise fail(f"{args.config} sets unknown option(s) {', '.join(unknown)}; see --help")
    for f in dataclasses.fields(config_cls):
        v = getattr(args, f.name)
        if v is not None:
            values[f.name] = v
    return config_cls(**values)


def resolve_device(name: str):
    """`auto` picks CUDA when present, else the CPU."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise fail(f"--device {name!r} is not a device; use auto, cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise fail("--device cuda asked for, but no CUDA GPU is available; use --device cpu")
    return device
