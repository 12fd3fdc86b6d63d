"""M2D-CLAP: general-purpose audio-language representations (the model, its pretraining, its loaders).

import m2dclap
model = m2dclap.load("m2d_clap_vit_base-80x1001p16x16p16kpBpTI-2025")   # or a folder / .pth file
a = model.encode_audio(waves, sample_rate=16000)
t = model.encode_text(["a dog barks"])
model.similarity(a, t)
"""

from .audio import AudioError, LogMelSpectrogram, load_audio
from .checkpoint import CheckpointError, load, save_pretrained
from .config import (
    EncoderCfg,
    FrontendCfg,
    ModelCfg,
    PredictorCfg,
    ProjectorCfg,
    TextCfg,
    get_model_config,
    list_models,
)
from .model import M2DCLAP
from .pretrained import list_pretrained

__version__ = "0.1.0"


def create_model(name: str = "base", pretrained_text: bool = True, **overrides) -> M2DCLAP:
    """A freshly initialised model from an architecture preset, with dotted config overrides."""
    return M2DCLAP(get_model_config(name, **overrides), pretrained_text=pretrained_text)


__all__ = [
    "AudioError",
    "CheckpointError",
    "EncoderCfg",
    "FrontendCfg",
    "LogMelSpectrogram",
    "M2DCLAP",
    "ModelCfg",
    "PredictorCfg",
    "ProjectorCfg",
    "TextCfg",
    "create_model",
    "get_model_config",
    "list_models",
    "list_pretrained",
    "load",
    "load_audio",
    "save_pretrained",
]
