"""Training on Accelerate (the only part of m2dclap that imports it): ``engine`` is the one loop; ``pretrain``
(stages 1, 2, 2.1), ``finetune`` (stage 1.1) and, outside this package, ``retrieval.finetune`` and
``captioning.train`` are its tasks."""

from .config import STAGES, TrainCfg, stage_config

__all__ = ["STAGES", "TrainCfg", "stage_config"]
