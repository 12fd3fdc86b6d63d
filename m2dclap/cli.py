"""The one CLI kit: options as a dataclass, one exit-code table, one logging setup, one device resolver.

A command is a dataclass of options and a function that runs them::

    @dataclass(kw_only=True)  # kw_only: required options may follow ones with defaults
    class Options:
        audio: list[str] = option(positional=True, metavar="AUDIO", help="audio files")
        checkpoint: str = option(help="model folder, .pth file or registered name")
        batch_size: int = option(16, minimum=1, metavar="N", help="files per model call")
        quiet: bool = option(False, aliases="-q", help="only warnings and errors")

    def run(opts: Options) -> int: ...

    def main(argv=None) -> int:
        return run_cli(run, Options, argv, prog="python -m pkg.module", description=__doc__)

``transformers.HfArgumentParser`` turns the dataclass into flags (``batch_size`` -> ``--batch-size``, a
``bool`` -> a switch, ``Literal[...]`` -> choices, ``list[X]`` -> several values); :func:`option` adds what it
lacks here: positional arguments, repeated options (``append``), a minimum, help from the field's metadata.
A training config becomes options with :func:`overrides_of` / :func:`apply_overrides`.

Exit codes (:data:`EXIT_STATUS`, appended to every ``--help``): 0 ok, 1 finished but skipped items (each
named on stderr), 2 bad input or usage -- argparse's own errors included (``SystemExit(2)``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import logging
import sys
import types
import typing
from typing import Any, Callable, Iterator, Sequence, TypeVar

from transformers import HfArgumentParser
from transformers.hf_argparser import string_to_bool

log = logging.getLogger(__name__)

EXIT_OK = 0  # everything done
EXIT_SKIPPED = 1  # finished, but items were skipped (each named on stderr)
EXIT_BAD_INPUT = 2  # bad input or usage; the run did not start, or stopped before writing
EXIT_STATUS = (
    "exit status: 0 ok; 1 finished, but items were skipped (each named on stderr); "
    "2 bad input or usage (one line on stderr naming the file or option)"
)
PACKAGES = ("m2dclap", "zeroshot", "retrieval", "captioning")  # the loggers a command shows
LOG_FORMAT = "%(levelname)s: %(message)s"
TEXT_MODEL_HELP = (
    "local folder (or hub name) of the checkpoint's text model, e.g. a copy of bert-base-uncased for "
    "an official 2025 checkpoint offline"
)

T = TypeVar("T")


class CliError(Exception):
    """Bad input found by a command (a file, an option value): one line ``prog: error: ...``, exit 2."""


class UsageError(CliError):
    """A wrong combination of options: reported as argparse does (usage line, then the message), exit 2."""


def option(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    aliases: str | Sequence[str] = (),
    metavar: str | None = None,
    positional: bool = False,
    append: bool = False,
    minimum: float | None = None,
    const: Any = None,
    group: str | None = None,
    choices: Sequence[Any] | None = None,
    default_factory: Any = dataclasses.MISSING,
) -> Any:
    """A dataclass field that is a command-line option; no default makes it required.

    ``positional``: an argument without a flag (a ``list`` takes one or more); ``append``: a ``list`` option
    given once per value (``--template A --template B``); ``minimum``: smaller numbers are bad input;
    ``const``: the value of the flag given without one (``--plot`` vs ``--plot x.png``); ``group``: a
    heading in ``--help``.
    """
    meta: dict[str, Any] = {"help": help}
    if const is not None:
        meta.update(nargs="?", const=const)
    if group is not None:
        meta["group"] = group
    if choices is not None:
        meta["choices"] = list(choices)
    if aliases:
        meta["aliases"] = [aliases] if isinstance(aliases, str) else list(aliases)
    if metavar is not None:
        meta["metavar"] = metavar
    if positional:
        meta["positional"] = True
    if append:
        meta["append"] = True
    if minimum is not None:
        meta["minimum"] = minimum
    return dataclasses.field(default=default, default_factory=default_factory, metadata=meta)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written; an option's default is added unless its help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            "default" in text.lower()
            or action.default in (None, False, [], argparse.SUPPRESS)
            or not action.option_strings
            or action.nargs == 0
        ):
            return text
        return f"{text} (default: %(default)s)"


class _DashedOptions:
    """What HfArgumentParser adds, with flags in the suite's spelling: ``--batch-size`` only (no
    ``--batch_size`` twin) and plain switches (``--quiet``, ``--no-recursive``) instead of ``--quiet [BOOL]``."""

    def __init__(self, parser: argparse.ArgumentParser | argparse._ArgumentGroup, append: bool):
        self.parser, self.append = parser, append

    def add_argument(self, *names: str, **kw: Any) -> argparse.Action:
        names = tuple(n for n in names if not (n.startswith("--") and "_" in n)) or names
        if kw.get("type") is string_to_bool and kw.get("nargs") == "?":
            for k in ("type", "nargs", "const"):
                kw.pop(k, None)
            kw["action"] = "store_true"
        if kw.get("action") == "store_false":  # the --no-X twin of a switch that is on by default
            kw["help"] = f"turn {names[0].replace('--no-', '--', 1)} off"
        if self.append:  # one value per --flag, collected in a list
            kw.pop("nargs", None)
            kw["action"] = "append"
        return self.parser.add_argument(*names, **kw)


class OptionParser(HfArgumentParser):
    """HfArgumentParser for one options dataclass, with the suite's help format and exit-code table."""

    def __init__(
        self, options: type, *, prog: str | None = None, description: str | None = None, epilog: str | None = None
    ):
        epilog = f"{epilog.rstrip()}\n\n{EXIT_STATUS}" if epilog else EXIT_STATUS
        super().__init__(options, prog=prog, description=description, epilog=epilog, formatter_class=HelpFormatter)
        self.options = options

    @staticmethod
    def _parse_dataclass_field(parser, field: dataclasses.Field) -> None:
        # HfArgumentParser's per-field hook: the kit's own metadata is handled here, the rest is the library's
        # (tests/test_cli.py pins the resulting flags, so a change of the hook in transformers shows there)
        meta = dict(field.metadata)
        group = meta.pop("group", None)
        if group is not None:  # one argparse group per heading, made when its first field comes
            groups = parser.__dict__.setdefault("_headings", {})
            if group not in groups:
                groups[group] = parser.add_argument_group(group)
            parser = groups[group]
        if meta.pop("positional", False):
            _add_positional(parser, field, meta)
            return
        append = meta.pop("append", False)
        meta.pop("minimum", None)
        if "metavar" not in meta and field.type in (int, int | None, float, float | None):
            meta["metavar"] = "N" if field.type in (int, int | None) else "X"
        plain = copy.copy(field)
        plain.metadata = types.MappingProxyType(meta)
        HfArgumentParser._parse_dataclass_field(_DashedOptions(parser, append), plain)

    def parse(self, argv: Sequence[str] | None = None) -> Any:
        """The options dataclass from ``argv`` (default ``sys.argv[1:]``); usage errors exit 2, ``--help`` 0."""
        # parse_args, not parse_args_into_dataclasses: an unknown option is a usage error (exit 2), not a ValueError
        namespace = self.parse_args(list(sys.argv[1:] if argv is None else argv))
        names = {f.name for f in dataclasses.fields(self.options) if f.init}
        return self.options(**{k: v for k, v in vars(namespace).items() if k in names})


def check_minimums(opts: Any) -> None:
    """Raise :class:`CliError` for a number below its field's ``minimum`` (``--batch-size 0``)."""
    for f in dataclasses.fields(opts):
        low, value = f.metadata.get("minimum"), getattr(opts, f.name)
        if low is not None and value is not None and value < low:
            raise CliError(f"{flag(f.name)} must be at least {low}, got {value}")


def _add_positional(parser, field: dataclasses.Field, meta: dict[str, Any]) -> None:
    kind = field.type
    many = typing.get_origin(kind) is list
    item = typing.get_args(kind)[0] if many else kind
    optional = field.default is not dataclasses.MISSING or field.default_factory is not dataclasses.MISSING
    kw: dict[str, Any] = {"help": meta.get("help"), "metavar": meta.get("metavar")}
    if "choices" in meta:
        kw["choices"] = meta["choices"]
    elif typing.get_origin(item) is typing.Literal:
        kw["choices"] = typing.get_args(item)
    elif item is not str:
        kw["type"] = item
    if many:
        kw["nargs"] = "*" if optional else "+"
    elif optional:
        kw["nargs"] = "?"
    if optional:
        kw["default"] = field.default if field.default is not dataclasses.MISSING else field.default_factory()
    parser.add_argument(field.name, **kw)


def flag(name: str) -> str:
    """The command-line spelling of an options field: ``batch_size`` -> ``--batch-size``."""
    return "--" + name.replace("_", "-")


# ----------------------------------------------------------------------------------------------- logging
@contextlib.contextmanager
def cli_logging(level: int = logging.INFO, loggers: Sequence[str] = PACKAGES) -> Iterator[None]:
    """Messages of the suite's packages on stderr at ``level`` while a command runs, written through tqdm so
    they do not tear a progress bar; the loggers are restored afterwards (tests run many commands)."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    targets = [logging.getLogger(name) for name in loggers]
    saved = [(lg.level, list(lg.handlers)) for lg in targets]
    for lg in targets:
        lg.addHandler(handler)
        lg.setLevel(level)
    try:
        with logging_redirect_tqdm(loggers=targets):
            yield
    finally:
        for lg, (lvl, handlers) in zip(targets, saved):
            lg.handlers = handlers
            lg.setLevel(lvl)


def log_level(opts: Any) -> int:
    """WARNING with ``--quiet``, DEBUG with ``--verbose``, else INFO."""
    if getattr(opts, "quiet", False):
        return logging.WARNING
    return logging.DEBUG if getattr(opts, "verbose", False) else logging.INFO


# ----------------------------------------------------------------------------------------------- devices
def resolve_device(device: str | None = None, option_name: str = "--device") -> str:
    """``None``/``auto``: cuda when available, else cpu; a named device is checked, so a run does not load a
    model and then fail on it. Raises :class:`CliError` naming ``option_name``."""
    import torch

    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError):
        raise CliError(f"{option_name} {device}: not a device (cpu, cuda, cuda:1, auto)") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise CliError(f"{option_name} {device} but no CUDA device is available")
    return device


# ----------------------------------------------------------------------------------------------- running
def fail(prog: str, msg: str) -> int:
    """``prog: error: msg`` on stderr; returns :data:`EXIT_BAD_INPUT`."""
    print(f"{prog}: error: {msg}", file=sys.stderr)
    return EXIT_BAD_INPUT


def run_cli(
    main_fn: Callable[[T], int],
    options: type[T],
    argv: Sequence[str] | None = None,
    *,
    prog: str,
    description: str | None = None,
    epilog: str | None = None,
) -> int:
    """Parse ``argv`` into ``options``, run ``main_fn(opts)`` with the suite's logging, return its exit code.

    ``CliError`` (and a ``CheckpointError``, said in its one-line CLI form) becomes ``prog: error: ...`` and
    exit 2; a :class:`UsageError` is reported with the usage line. ``--help`` and argparse's own errors
    raise ``SystemExit`` (0 and 2) as usual.
    """
    from .checkpoint import CheckpointError

    parser = OptionParser(options, prog=prog, description=description, epilog=epilog)
    opts = parser.parse(argv)
    with cli_logging(log_level(opts)):
        try:
            check_minimums(opts)
            return int(main_fn(opts))
        except UsageError as e:
            parser.error(str(e))
        except CheckpointError as e:
            return fail(prog, e.for_cli())
        except CliError as e:
            return fail(prog, str(e))


# ----------------------------------------------------------------------------------------------- configs
def overrides_of(cfg: type, *, exclude: Sequence[str] = (), name: str | None = None) -> type:
    """An options dataclass with one optional flag per field of the config dataclass ``cfg`` (help from the
    field's ``metadata["help"]``); a flag not given stays ``None``, so the config's or a preset's value is
    kept. ``tuple[float, float]`` fields take several values. Use with :func:`apply_overrides`."""
    hints = typing.get_type_hints(cfg)
    fields = []
    for f in dataclasses.fields(cfg):
        if f.name in exclude or not f.init:
            continue
        kind = hints[f.name]
        if typing.get_origin(kind) is tuple:
            kind = list[typing.get_args(kind)[0]]
        if typing.get_origin(kind) in (typing.Union, types.UnionType):
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        base = typing.get_args(kind)[0] if typing.get_origin(kind) is list else kind
        meta = {"help": f.metadata.get("help", ""), "metavar": getattr(base, "__name__", "VALUE").upper()}
        fields.append((f.name, kind | None, dataclasses.field(default=None, metadata=meta)))
    return dataclasses.make_dataclass(name or f"{cfg.__name__}Overrides", fields)


def apply_overrides(cfg: T, overrides: Any) -> T:
    """``cfg`` with every field that ``overrides`` sets (not ``None``) replaced; lists become tuples where
    the config holds a tuple."""
    changes = {}
    for f in dataclasses.fields(overrides):
        value = getattr(overrides, f.name)
        if value is not None and hasattr(cfg, f.name):
            changes[f.name] = tuple(value) if isinstance(getattr(cfg, f.name), tuple) else value
    return dataclasses.replace(cfg, **changes)
