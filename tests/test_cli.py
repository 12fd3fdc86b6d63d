"""The CLI kit (m2dclap.cli): options from dataclasses, the exit-code table, logging, devices; and every
console script of pyproject.toml imports and answers --help with exit 0."""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import tomllib

from m2dclap.cli import (
    EXIT_STATUS,
    CliError,
    OptionParser,
    UsageError,
    apply_overrides,
    cli_logging,
    option,
    overrides_of,
    resolve_device,
    run_cli,
)

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Opts:
    audio: list[str] = option(positional=True, metavar="AUDIO", help="audio files")
    checkpoint: str = option(aliases="-c", help="model")
    batch_size: int = option(16, minimum=1, metavar="N", help="files per model call")
    device: Literal["cpu", "cuda"] | None = option(None, help="where the model runs")
    template: list[str] | None = option(None, append=True, help="a prompt; repeat for several")
    recursive: bool = option(True, help="search folders recursively (default: --recursive)")
    quiet: bool = option(False, aliases="-q", help="only warnings")
    scale: float = option(1.0, help="cosine scale")


def _parse(argv):
    return OptionParser(Opts, prog="prog").parse(argv)


def test_options_parse_into_the_dataclass():
    opts = _parse(
        [
            "a.wav",
            "b.wav",
            "-c",
            "m",
            "--batch-size",
            "4",
            "--template",
            "x {}",
            "--template",
            "y",
            "--no-recursive",
            "-q",
            "--device",
            "cpu",
            "--scale",
            "100",
        ]
    )
    assert opts == Opts(
        audio=["a.wav", "b.wav"],
        checkpoint="m",
        batch_size=4,
        device="cpu",
        template=["x {}", "y"],
        recursive=False,
        quiet=True,
        scale=100.0,
    )
    assert _parse(["a.wav", "--checkpoint", "m"]) == Opts(audio=["a.wav"], checkpoint="m")


def test_help_shows_dashed_flags_defaults_and_the_exit_table(capsys):
    with pytest.raises(SystemExit) as e:
        _parse(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--batch-size N" in out and "--batch_size" not in out
    assert "(default: 16)" in out and "--no-recursive" in out and "[QUIET]" not in out
    assert " ".join(EXIT_STATUS.split()) in " ".join(out.split())


@pytest.mark.parametrize(
    "argv, names",
    [
        (["-c", "m"], "AUDIO"),  # a missing positional
        (["a.wav"], "--checkpoint"),  # a missing required option
        (["a.wav", "-c", "m", "--device", "tpu"], "--device"),  # not one of the choices
        (["a.wav", "-c", "m", "--batch-size", "x"], "--batch-size"),  # not a number
        (["a.wav", "-c", "m", "--bacth-size", "4"], "--bacth-size"),  # an unknown option
    ],
)
def test_usage_errors_exit_2_naming_the_option(argv, names, capsys):
    with pytest.raises(SystemExit) as e:
        _parse(argv)
    assert e.value.code == 2
    assert names in capsys.readouterr().err


def _runner(result):
    def run(opts: Opts) -> int:
        logging.getLogger("m2dclap.test").info("running %s", opts.audio[0])
        if isinstance(result, Exception):
            raise result
        return result

    return run


@pytest.mark.parametrize(
    "result, code, message",
    [(0, 0, None), (1, 1, None), (CliError("x.wav: not audio"), 2, "prog: error: x.wav: not audio")],
)
def test_run_cli_exit_table(result, code, message, capsys):
    assert run_cli(_runner(result), Opts, ["a.wav", "-c", "m"], prog="prog") == code
    err = capsys.readouterr().err
    assert "INFO: running a.wav" in err
    if message:
        assert message in err


def test_run_cli_minimum_and_usage_errors(capsys):
    assert run_cli(_runner(0), Opts, ["a.wav", "-c", "m", "--batch-size", "0"], prog="prog") == 2
    assert "prog: error: --batch-size must be at least 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        run_cli(_runner(UsageError("--labels or --labels-file")), Opts, ["a.wav", "-c", "m"], prog="prog")
    assert e.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_run_cli_reports_a_checkpoint_error_in_one_line(capsys):
    from m2dclap import CheckpointError

    assert run_cli(_runner(CheckpointError("m: not a checkpoint")), Opts, ["a.wav", "-c", "m"], prog="prog") == 2
    err = capsys.readouterr().err
    assert "prog: error:" in err and "m: not a checkpoint" in err and "Traceback" not in err


def test_quiet_hides_info_and_logging_is_restored(capsys):
    logger = logging.getLogger("m2dclap")
    before = (logger.level, list(logger.handlers))
    assert run_cli(_runner(0), Opts, ["a.wav", "-c", "m", "-q"], prog="prog") == 0
    assert "running" not in capsys.readouterr().err
    assert (logger.level, list(logger.handlers)) == before
    with cli_logging(logging.WARNING):
        logging.getLogger("zeroshot.x").warning("careful")
    assert "WARNING: careful" in capsys.readouterr().err


def test_resolve_device():
    import torch

    assert resolve_device(None) == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("auto") == resolve_device(None)
    assert resolve_device("cpu") == "cpu"
    with pytest.raises(CliError, match="--device tpu0"):
        resolve_device("tpu0")
    if not torch.cuda.is_available():
        with pytest.raises(CliError, match="--device cuda:1 but no CUDA"):
            resolve_device("cuda:1")


@dataclass
class Cfg:
    lr: float = field(default=1e-3, metadata={"help": "learning rate"})
    betas: tuple[float, float] = (0.9, 0.95)
    name: str = "run"
    fused: bool = False


def test_config_overrides_keep_unset_fields():
    parser = OptionParser(overrides_of(Cfg), prog="train")
    opts = parser.parse(["--lr", "0.5", "--betas", "0.8", "0.9"])
    assert apply_overrides(Cfg(name="preset"), opts) == Cfg(lr=0.5, betas=(0.8, 0.9), name="preset")
    assert apply_overrides(Cfg(), parser.parse([])) == Cfg()
    assert "learning rate" in parser.format_help()


# ------------------------------------------------------------------------------------------- console scripts
def _console_scripts() -> dict[str, str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["scripts"]


def test_every_command_has_a_console_script():
    scripts = _console_scripts()
    assert all(name.startswith("m2dclap-") for name in scripts)
    targets = set(scripts.values())
    # every module runnable as ``python -m`` (a __main__ guard, or a package's __main__.py) has one
    commands = set()
    for package in ("m2dclap", "retrieval", "zeroshot", "captioning"):
        for path in (ROOT / package).rglob("*.py"):
            module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            if path.name == "__main__.py":
                commands.add(module.rsplit(".", 1)[0])
            elif 'if __name__ == "__main__":' in path.read_text(encoding="utf-8"):
                commands.add(module)
    assert len(commands) >= 17
    for module in commands:
        assert f"{module}:main" in targets, module


@pytest.mark.parametrize("name", sorted(_console_scripts()))
def test_console_script_target_answers_help(name, capsys):
    module, func = _console_scripts()[name].split(":")
    main = getattr(importlib.import_module(module), func)
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0, name
    assert "usage:" in capsys.readouterr().out


KIT_COMMANDS = (
    "m2dclap.extract",
    "m2dclap.embed_captions",
    "m2dclap.data.synthetic",
    "zeroshot.evaluate",
    "zeroshot.classify",
    "retrieval.evaluate",
    "retrieval.submit",
    "retrieval.datasets",
    "captioning.caption",
    "captioning.evaluate",
    "captioning.preprocess",
)


@pytest.mark.parametrize("module", KIT_COMMANDS)
def test_kit_commands_show_the_exit_table_and_exit_2_on_a_usage_error(module, capsys):
    main = importlib.import_module(module).main
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    assert " ".join(EXIT_STATUS.split()) in " ".join(capsys.readouterr().out.split())
    with pytest.raises(SystemExit) as e:
        main(["--no-such-option"])
    assert e.value.code == 2
    assert "error:" in capsys.readouterr().err
