"""Command line for the scripts: a dataclass of hyperparameters becomes flags.

Each script declares its hyperparameters once, in a `@dataclass Config` at the
top of the file with a trailing comment per field. `parse_config(Config)` turns
every field into a flag (`lr` -> `--lr`, `max_steps` -> `--max-steps`) whose
help text is that comment, so `--help` always matches the file. Every
value, from a flag or a `--config` file, is checked against its field's type
and against the range its Config gives it (RANGES) before `main` runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import inspect
import json
import math
import re
import reprlib
import sys
from pathlib import Path
from typing import Any, Callable, get_type_hints


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


def numbers(text: str, flag: str, what: str) -> list[float]:
    """A flag's comma-separated numbers ("0,0.5,1"), or a one-line error that
    names the flag; `what` names one of them in that error."""
    try:
        values = [float(v) for v in text.split(",") if v]
    except ValueError:
        raise fail(f"{flag} must be comma-separated numbers, got {text!r}") from None
    if not values:
        raise fail(f"{flag} names no {what}")
    return values


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
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        print(f"error: no space left on the disk ({e.filename or e}); free some space and run the command "
              f"again", file=sys.stderr)
        sys.exit(2)


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


def flag(name: str) -> str:
    """The flag of a Config field: `max_steps` -> `--max-steps`."""
    return "--" + name.replace("_", "-")


def program_name() -> str | None:
    """How the running script was started, for its usage line: `python -m
    experiments.train_ppo` for a script in a folder, None (argparse's own, the
    file's name) for one at the root."""
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    return f"python -m {spec.name}" if spec is not None and "." in spec.name else None


def build_parser(config_cls: type) -> argparse.ArgumentParser:
    doc = inspect.getmodule(config_cls).__doc__ or ""
    parser = argparse.ArgumentParser(
        prog=program_name(),
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
        help_text = comments.get(f.name, "")
        help_text = f"{help_text} (default: {default})" if help_text else f"(default: {default})"
        help_text = help_text.replace("%", "%%")  # argparse formats help with %
        kind = hints[f.name] if not isinstance(hints[f.name], str) else None
        if isinstance(default, bool) or kind is bool or hints[f.name] == "bool":
            parser.add_argument(flag(f.name), dest=f.name, type=_parse_bool, nargs="?", const=True,
                                default=None, metavar="BOOL", help=help_text)
        elif default is None:
            parser.add_argument(flag(f.name), dest=f.name, type=str, default=None, help=help_text)
        else:
            parser.add_argument(flag(f.name), dest=f.name, type=type(default), default=None, help=help_text)
    return parser


@dataclasses.dataclass(frozen=True)
class Range:
    """What a number option may be, as its error says it, and the test."""
    says: str
    ok: Callable[[float], bool]


# The ranges a Config's RANGES gives its number options (a field it leaves
# out, such as action_repeat, its script checks itself).
AT_LEAST_1 = Range("at least 1", lambda v: v >= 1)
AT_LEAST_2 = Range("at least 2 (CMA-ES ranks members against each other)", lambda v: v >= 2)
NON_NEGATIVE = Range("non-negative", lambda v: v >= 0)
POSITIVE = Range("positive", lambda v: v > 0)
FRACTION = Range("between 0 and 1", lambda v: 0 < v < 1)
UNIT = Range("from 0 to 1", lambda v: 0 <= v <= 1)

# How a --config error names each JSON type an option takes.
TYPE_NAMES = {int: "a whole number", float: "a number", str: "a string", bool: "true or false"}


def parse_config(config_cls: type, argv: list[str] | None = None):
    """Defaults from the dataclass, then a `--config` JSON file, then flags;
    every value is checked against the Config's RANGES, with one line naming
    its flag, or its key and file."""
    parser = build_parser(config_cls)
    args = parser.parse_args(argv)
    values: dict[str, Any] = {}
    where: dict[str, str] = {}  # how an error names the option: its flag, or its key and file
    if args.config is not None:
        values = read_config_file(args.config, config_cls)
        where = {name: f"{name} in {args.config}" for name in values}
    for f in dataclasses.fields(config_cls):
        v = getattr(args, f.name)
        if v is not None:
            values[f.name] = v
            where[f.name] = flag(f.name)
    cfg = config_cls(**values)
    check_ranges(vars(cfg), getattr(config_cls, "RANGES", {}), where)
    return cfg


def check_ranges(values: dict[str, Any], ranges: dict[str, Range], where: dict[str, str] | None = None) -> None:
    """Fail with one line for the first value out of its range in `ranges`,
    named as `where` says (else by its flag)."""
    for name, value in values.items():
        if isinstance(value, float) and not math.isfinite(value):  # no option of any script means inf or nan
            raise fail(f"{(where or {}).get(name, flag(name))} must be a finite number, got {value}")
        if name in ranges and not ranges[name].ok(value):
            raise fail(f"{(where or {}).get(name, flag(name))} must be {ranges[name].says}, got {value}")


def read_config_file(path: Path, config_cls: type) -> dict[str, Any]:
    """The options a `--config` JSON file sets, each of its field's type (an
    int where a float goes is a float), or one line naming the key and file."""
    try:
        values = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise fail(f"cannot read --config {path}: {e}")
    if not isinstance(values, dict):
        raise fail(f"--config {path} holds {reprlib.repr(values)}, not an object of options "
                   f'such as {{"epochs": 1}}; see --help')
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise fail(f"{path} sets unknown option(s) {', '.join(unknown)}; see --help")
    hints = get_type_hints(config_cls)
    for name, value in values.items():
        kind = hints[name]
        if kind is float and type(value) is int:
            values[name] = float(value)
        elif kind in TYPE_NAMES and type(value) is not kind and (value, fields[name].default) != (None, None):
            raise fail(f"{name} in {path} must be {TYPE_NAMES[kind]}, got {json.dumps(value)}; fix it there")
    return values


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
