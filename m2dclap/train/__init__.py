"""Pretraining on Accelerate (the only package that imports accelerate)."""
from .config import STAGES, TrainCfg, stage_config

__all__ = ["STAGES", "TrainCfg", "stage_config"]
