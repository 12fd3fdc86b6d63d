"""M2D-CLAP pretraining, the suite's main job.

accelerate launch scripts/pretrain.py                # default run: embedded corpus, tiny model, CPU, minutes
accelerate launch scripts/pretrain.py --stage 1 --preset base --data MANIFEST --captions CAPEMB.npy ...
"""

from __future__ import annotations

import sys

from m2dclap.train.pretrain_cli import main  # the command lives in the package (console script, python -m)

if __name__ == "__main__":
    sys.exit(main())
