"""The pretraining command: the default pipeline, or one stage with the paper's settings (``--stage``).

accelerate launch -m m2dclap.train.pretrain_cli            # default run: embedded corpus, tiny model, CPU
accelerate launch scripts/pretrain.py --stage 1 --preset base --data MANIFEST --captions CAPEMB.npy ...
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path

FINETUNE_STAGE = "1.1"  # AudioSet fine-tuning has its own options (FinetuneCfg)
DESCRIPTION = (
    "Pretrain M2D-CLAP (paper section III-B). With no --stage, runs the default pipeline on the embedded "
    "synthetic corpus (generated and cached on first use): stage 1 (M2D + CLAP on pre-computed MiniLM "
    "caption embeddings) then stage 2 (CLAP with a trainable text encoder and a frozen audio encoder), "
    "evaluates on the held-out test split and prints a report. With --stage it runs one stage with the "
    "paper's hyper-parameters, each overridable (the training options: any TrainCfg field; defaults are "
    "the stage preset's)."
)
_OWN = ("stage", "resume", "fresh", "n_clips", "verbose", "quiet")


def _options() -> type:
    from ..cli import option, overrides_of
    from .config import STAGES, TrainCfg

    @dataclass(kw_only=True)
    class PretrainOptions(overrides_of(TrainCfg, exclude=("stage",), name="TrainOverrides")):
        stage: str | None = option(
            None,
            choices=sorted(STAGES) + [FINETUNE_STAGE],
            help="run one stage (omit for the default pipeline); --stage 1.1 (AudioSet "
            "fine-tuning) takes the options of python -m m2dclap.train.finetune",
        )
        resume: bool = option(
            False,
            help="with --stage: continue from the latest complete checkpoint in "
            "--output-dir (the default pipeline always reuses finished stages and "
            "resumes the unfinished one unless --fresh)",
        )
        fresh: bool = option(False, help="default pipeline: ignore earlier results (stages and caption embeddings)")
        n_clips: int = option(2000, minimum=1, help="default pipeline: size of the synthetic corpus")
        verbose: bool = option(False, aliases="-v", help="debug messages too")
        quiet: bool = option(False, aliases="-q", help="only warnings and errors")

    return PretrainOptions


def _split_stage(argv: list[str]) -> tuple[str | None, list[str]]:
    """The value of --stage and the arguments without it."""
    stage, rest, skip = None, [], False
    for i, a in enumerate(argv):
        if skip:
            skip = False
        elif a == "--stage" and i + 1 < len(argv):
            stage, skip = argv[i + 1], True
        elif a.startswith("--stage="):
            stage = a.split("=", 1)[1]
        else:
            rest.append(a)
    return stage, rest


def main(argv: list[str] | None = None) -> int:
    from ..cli import run_cli

    argv = sys.argv[1:] if argv is None else list(argv)
    stage, rest = _split_stage(argv)
    if stage == FINETUNE_STAGE:
        from .finetune import main as finetune_main

        return finetune_main(rest)
    return run_cli(run, _options(), argv, prog="accelerate launch scripts/pretrain.py", description=DESCRIPTION)


def run(opts) -> int:
    from ..checkpoint import CheckpointError
    from ..cli import CliError

    overrides = {
        f.name: getattr(opts, f.name)
        for f in dataclasses.fields(opts)
        if f.name not in _OWN and getattr(opts, f.name) is not None
    }
    try:
        if opts.stage is None:
            return _default(opts, overrides)
        return _one_stage(opts, overrides)
    except CheckpointError:
        raise
    except (ValueError, KeyError, OSError) as e:
        raise CliError(str(e).strip("'\"")) from None


def _default(args, overrides) -> int:
    from .pipeline import default_run

    out = overrides.pop("output_dir", "runs/default")
    own = sorted(k for k in ("data", "init", "captions") if k in overrides)
    if own:  # the default run makes its corpus, caption embeddings and stage-2 initialisation itself
        raise ValueError(
            f"--{', --'.join(own)} {'needs' if len(own) == 1 else 'need'} --stage; the default "
            "run uses the embedded corpus"
        )
    seed = int(overrides.pop("seed", 0))  # seeds the corpus too
    per_stage = {"1": dict(overrides), "2": dict(overrides)}
    result = default_run(out, n_clips=args.n_clips, seed=seed, resume=not args.fresh, stage_overrides=per_stage)
    print(result["text"])
    print(f"model: {result['model']}  (load it with m2dclap.load)\nreport: {Path(out) / 'report.json'}")
    return 0


def _one_stage(args, overrides) -> int:
    from ..data.synthetic import default_corpus_dir, generate_corpus
    from .config import stage_config
    from .finetune import exit_status
    from .pretrain import train

    overrides["data"] = overrides.get("data") or str(generate_corpus(default_corpus_dir()))
    cfg = stage_config(args.stage, **overrides)  # the resolved config records the manifest
    summary = train(cfg, cfg.data, resume=args.resume)
    print(json.dumps(summary, indent=2))
    return exit_status(summary)  # 1 when clips were skipped as bad audio


if __name__ == "__main__":
    sys.exit(main())
