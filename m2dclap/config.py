"""Configuration dataclasses and named architecture presets.

Architecture presets (``base``, ``base-1001``, ``tiny``) live here; pretrained weights live in
``m2dclap.pretrained`` and carry their own normalisation statistics (STYLE.md item 3).
"""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any


@dataclass
class FrontendCfg:
    """Log-mel frontend, identical to the official runtime (reference/m2d-official.md section 2)."""

    sample_rate: int = 16000  # Hz; audio is resampled to this rate
    n_fft: int = 400  # FFT size (25 ms at 16 kHz)
    win_length: int = 400  # periodic Hann window length
    hop_length: int = 160  # 10 ms at 16 kHz
    n_mels: int = 80  # Slaney-scale, Slaney-normalised mel bins
    f_min: float = 50.0  # lowest mel edge (Hz)
    f_max: float = 8000.0  # highest mel edge (Hz)
    norm_stats: tuple[float, float] = (-7.1, 4.2)  # (mean, std) of the log-mel; the checkpoint's value wins

    @property
    def min_samples(self) -> int:
        """Shortest waveform the frontend accepts: reflect padding of n_fft // 2 needs one sample more."""
        return self.n_fft // 2 + 1

    @classmethod
    def p16k(cls, **kw: Any) -> "FrontendCfg":
        return cls(**kw)

    @classmethod
    def p32k(cls, **kw: Any) -> "FrontendCfg":
        base = dict(sample_rate=32000, n_fft=800, win_length=800, hop_length=320, f_max=16000.0)
        base.update(kw)
        return cls(**base)


@dataclass
class EncoderCfg:
    """ViT audio encoder (M2D's ``f_theta``)."""

    input_size: tuple[int, int] = (80, 608)  # (mel bins, frames) of one chunk
    patch_size: tuple[int, int] = (16, 16)  # (freq, time) patch size
    embed_dim: int = 768  # token width D
    depth: int = 12  # transformer blocks
    num_heads: int = 12  # attention heads
    mlp_ratio: float = 4.0  # FFN width / D
    qkv_bias: bool = True  # bias on the qkv projection
    norm_eps: float = 1e-6  # LayerNorm eps of the encoder (the projector uses 1e-5)

    @property
    def grid_size(self) -> tuple[int, int]:
        """(freq, time) patch grid of one full chunk; the conv floors partial patches."""
        return (self.input_size[0] // self.patch_size[0], self.input_size[1] // self.patch_size[1])


@dataclass
class PredictorCfg:
    """M2D predictor (``g_theta``, the official 'decoder')."""

    embed_dim: int = 512  # predictor width
    depth: int = 8  # predictor blocks
    num_heads: int = 16  # predictor heads
    mlp_ratio: float = 4.0  # FFN width / width


@dataclass
class ProjectorCfg:
    """Audio projector turning patch features into a CLAP audio feature s_a."""

    kind: str = "transformer"  # "transformer" (2025 AudioToSemantic), "mlp" (2024), or "none"
    depth: int = 1  # transformer blocks (2025: 1)
    num_heads: int = 1  # heads (2025: 1)
    mlp_ratio: float = 1.0  # FFN width / D (2025: 1, i.e. 768)
    norm_eps: float = 1e-5  # LayerNorm eps (torch default, as in the official projector)


@dataclass
class TextCfg:
    """CLAP text tower.

    ``kind``:
      * ``"hf"``: a Hugging Face encoder (BERT, GTE, MiniLM ...) trained with the model; its
        weights are part of the checkpoint (``text_encoder.text_encoder.*``, the official 2025 key layout).
      * ``"sentence"``: a frozen sentence-embedding model (NV-Embed-v2 in the paper) used through
        sentence-transformers; training uses its pre-computed embeddings. Not stored in checkpoints.
      * ``"none"``: no text tower (M2D-only models).
    """

    kind: str = "hf"  # "hf", "sentence" or "none"
    name: str = "google-bert/bert-base-uncased"  # hub name, local folder, or a registered alias
    pooling: str = "cls"  # "cls" (BERT, official 'B') or "mean" (GTE/MiniLM, masked mean)
    width: int = 768  # output width of the text model (4096 for NV-Embed-v2)
    max_length: int = 512  # tokens per caption
    add_eos: bool = False  # append the tokenizer's EOS to every text (NV-Embed-v2 convention)


@dataclass
class ModelCfg:
    """A whole M2D-CLAP model: frontend, encoder, predictor (training only), projector, text tower."""

    name: str = "base"  # preset name this config came from
    frontend: FrontendCfg = field(default_factory=FrontendCfg)
    encoder: EncoderCfg = field(default_factory=EncoderCfg)
    predictor: PredictorCfg = field(default_factory=PredictorCfg)
    projector: ProjectorCfg = field(default_factory=ProjectorCfg)
    text: TextCfg = field(default_factory=TextCfg)
    init_temperature: float = 0.07  # tau at initialisation (CLIP)
    max_logit_scale: float = 100.0  # 1/tau is clamped at this value

    @property
    def init_logit_scale(self) -> float:
        return math.log(1.0 / self.init_temperature)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelCfg":
        d = dict(d)
        sub = {"frontend": FrontendCfg, "encoder": EncoderCfg, "predictor": PredictorCfg,
               "projector": ProjectorCfg, "text": TextCfg}
        kwargs: dict[str, Any] = {}
        for key, value in d.items():
            if key in sub:
                kwargs[key] = _build(sub[key], value, key)
            elif key in {f.name for f in dataclasses.fields(cls)}:
                kwargs[key] = value
            else:
                raise ValueError(f"unknown model config field {key!r}")
        return cls(**kwargs)


def _build(klass: type, value: Any, where: str) -> Any:
    if isinstance(value, klass):
        return value
    if not isinstance(value, dict):
        raise ValueError(f"config field {where!r} must be a mapping, got {type(value).__name__}")
    names = {f.name for f in dataclasses.fields(klass)}
    unknown = set(value) - names
    if unknown:
        raise ValueError(f"unknown field(s) {sorted(unknown)} in config section {where!r}")
    fixed = {k: tuple(v) if isinstance(v, list) else v for k, v in value.items()}
    return klass(**fixed)


def _base() -> ModelCfg:
    return ModelCfg(name="base")


def _base_1001() -> ModelCfg:
    # The released 2025 model: 10.01-s chunks (62 time patches), BERT text encoder.
    return ModelCfg(name="base-1001", encoder=EncoderCfg(input_size=(80, 1001)))


def _tiny() -> ModelCfg:
    # Fast on 2 CPU cores: the real frontend, a narrow 2-block ViT on 1.28-s chunks.
    return ModelCfg(
        name="tiny",
        encoder=EncoderCfg(input_size=(80, 128), embed_dim=64, depth=2, num_heads=4, mlp_ratio=4.0),
        predictor=PredictorCfg(embed_dim=64, depth=1, num_heads=4),
        projector=ProjectorCfg(kind="transformer", depth=1, num_heads=1, mlp_ratio=1.0),
        text=TextCfg(kind="hf", name="all-MiniLM-L6-v2", pooling="mean", width=384, max_length=64),
    )


_PRESETS = {"base": _base, "base-1001": _base_1001, "tiny": _tiny}


def list_models() -> list[str]:
    """Names of the architecture presets."""
    return sorted(_PRESETS)


def get_model_config(name: str, **overrides: Any) -> ModelCfg:
    """A fresh copy of preset ``name`` with dotted overrides, e.g. ``{"encoder.depth": 4}``."""
    if name not in _PRESETS:
        raise KeyError(f"unknown model preset {name!r}; known: {', '.join(list_models())}")
    cfg = _PRESETS[name]()
    return apply_overrides(cfg, overrides)


def apply_overrides(cfg: Any, overrides: dict[str, Any]) -> Any:
    """Set dotted fields (``"encoder.depth"``) on a copy of a dataclass config, checking names."""
    cfg = copy.deepcopy(cfg)
    for dotted, value in overrides.items():
        obj = cfg
        parts = dotted.split(".")
        for part in parts[:-1]:
            if not hasattr(obj, part):
                raise KeyError(f"unknown config field {dotted!r}")
            obj = getattr(obj, part)
        if not dataclasses.is_dataclass(obj) or parts[-1] not in {f.name for f in dataclasses.fields(obj)}:
            raise KeyError(f"unknown config field {dotted!r}")
        current = getattr(obj, parts[-1])
        setattr(obj, parts[-1], coerce_like(current, value, dotted))
    return cfg


def coerce_like(current: Any, value: Any, where: str) -> Any:
    """Convert a CLI string to the type of the current value (bool, int, float, tuple, str)."""
    if not isinstance(value, str):
        return tuple(value) if isinstance(current, tuple) and isinstance(value, list) else value
    try:
        if isinstance(current, bool):
            if value.lower() in {"1", "true", "yes", "on"}:
                return True
            if value.lower() in {"0", "false", "no", "off"}:
                return False
            raise ValueError(value)
        if isinstance(current, int):
            return int(value)
        if isinstance(current, float):
            return float(value)
        if isinstance(current, tuple):
            sep = "x" if "x" in value else ","
            items = [s for s in value.split(sep) if s]
            kinds = [type(c) for c in current] or [float] * len(items)
            return tuple(kinds[min(i, len(kinds) - 1)](s) for i, s in enumerate(items))
    except ValueError:
        raise ValueError(f"config field {where!r}: cannot read {value!r} as {type(current).__name__}") from None
    return value
