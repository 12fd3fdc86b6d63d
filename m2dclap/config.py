"""Configuration dataclasses and named architecture presets.

Architecture presets (``base``, ``base-1001``, ``tiny``) live here; pretrained weights live in
``m2dclap.pretrained`` and carry their own normalisation statistics (STYLE.md item 3).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import typing
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
    def from_dict(cls, d: Any) -> "ModelCfg":
        """Build from a JSON mapping, checking every field's type and value (errors name the dotted field)."""
        if not isinstance(d, dict):
            raise ConfigError(f"the model config must be a mapping, got {type(d).__name__}")
        sub = {
            "frontend": FrontendCfg,
            "encoder": EncoderCfg,
            "predictor": PredictorCfg,
            "projector": ProjectorCfg,
            "text": TextCfg,
        }
        top = {k: v for k, v in d.items() if k not in sub}
        kwargs = _typed_fields(cls, top, "")
        for key, klass in sub.items():
            if key in d:
                kwargs[key] = _build(klass, d[key], key)
        cfg = cls(**kwargs)
        cfg.validate()
        return cfg

    def validate(self) -> "ModelCfg":
        """Check values and their relations (sizes positive, heads dividing widths ...); raise ConfigError."""
        _check_model(self)
        return self


class ConfigError(ValueError):
    """A config field of the wrong type or value; the message starts with the dotted field name."""


def _build(klass: type, value: Any, where: str) -> Any:
    if isinstance(value, klass):
        return value
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(value).__name__}")
    return klass(**_typed_fields(klass, value, where + "."))


def _typed_fields(klass: type, values: dict[str, Any], prefix: str) -> dict[str, Any]:
    """Check each value against the dataclass field's annotation; lists become tuples, ints floats."""
    hints = typing.get_type_hints(klass)
    names = [f.name for f in dataclasses.fields(klass) if f.init]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ConfigError(f"unknown field(s) {', '.join(prefix + u for u in unknown)}")
    return {k: _typed(v, hints[k], prefix + k) for k, v in values.items() if k in names}


def _typed(value: Any, hint: Any, where: str) -> Any:
    if typing.get_origin(hint) is tuple:
        kinds = typing.get_args(hint)
        if not isinstance(value, (list, tuple)) or len(value) != len(kinds):
            raise ConfigError(f"{where}={value!r} must be a list of {len(kinds)} {_PLURALS[kinds[0]]}")
        return tuple(_typed(v, k, f"{where}[{i}]") for i, (v, k) in enumerate(zip(value, kinds)))
    # bool is an int in Python, but true/false where a number is expected is a mistake in the file
    ok = {
        int: lambda v: isinstance(v, int) and not isinstance(v, bool),
        float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        bool: lambda v: isinstance(v, bool),
        str: lambda v: isinstance(v, str),
    }[hint]
    if not ok(value):
        raise ConfigError(f"{where}={value!r} is not {_NAMES[hint]}")
    if hint is float:
        if not math.isfinite(value):
            raise ConfigError(f"{where}={value!r} is not a finite number")
        return float(value)
    return value


_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
_PLURALS = {int: "integers", float: "numbers", bool: "booleans", str: "strings"}


def _check_model(cfg: "ModelCfg") -> None:
    def need(ok: bool, where: str, value: Any, what: str) -> None:
        if not ok:
            raise ConfigError(f"{where}={value!r} {what}")

    def heads(section: str, dim: int, n: int, dim_name: str) -> None:
        need(n >= 1, f"{section}.num_heads", n, "must be at least 1")
        need(dim % n == 0, f"{section}.num_heads", n, f"does not divide {dim_name}={dim}")

    fe, enc, pred, proj, text = cfg.frontend, cfg.encoder, cfg.predictor, cfg.projector, cfg.text
    for name in ("sample_rate", "n_fft", "win_length", "hop_length", "n_mels"):
        need(getattr(fe, name) > 0, f"frontend.{name}", getattr(fe, name), "must be positive")
    need(fe.win_length <= fe.n_fft, "frontend.win_length", fe.win_length, f"exceeds n_fft={fe.n_fft}")
    need(0 <= fe.f_min < fe.f_max, "frontend.f_min", fe.f_min, f"must be >= 0 and below f_max={fe.f_max}")
    need(
        fe.f_max <= fe.sample_rate / 2,
        "frontend.f_max",
        fe.f_max,
        f"exceeds the Nyquist frequency of sample_rate={fe.sample_rate}",
    )
    need(fe.norm_stats[1] > 0, "frontend.norm_stats", list(fe.norm_stats), "needs a positive std (2nd value)")
    for name in ("input_size", "patch_size"):
        need(all(v > 0 for v in getattr(enc, name)), f"encoder.{name}", list(getattr(enc, name)), "must be positive")
    need(
        all(p <= i for p, i in zip(enc.patch_size, enc.input_size)),
        "encoder.patch_size",
        list(enc.patch_size),
        f"is larger than input_size={list(enc.input_size)}",
    )
    need(
        enc.input_size[0] == fe.n_mels,
        "encoder.input_size",
        list(enc.input_size),
        f"must start with frontend.n_mels={fe.n_mels}",
    )
    for section, c in (("encoder", enc), ("predictor", pred)):
        need(c.embed_dim > 0, f"{section}.embed_dim", c.embed_dim, "must be positive")
        need(c.depth >= 1, f"{section}.depth", c.depth, "must be at least 1")
        heads(section, c.embed_dim, c.num_heads, "embed_dim")
        need(c.mlp_ratio > 0, f"{section}.mlp_ratio", c.mlp_ratio, "must be positive")
    need(enc.norm_eps > 0, "encoder.norm_eps", enc.norm_eps, "must be positive")
    need(proj.kind in ("transformer", "mlp", "none"), "projector.kind", proj.kind, "is not transformer, mlp or none")
    if proj.kind == "transformer":  # the projector's blocks work at the encoder width
        need(proj.depth >= 1, "projector.depth", proj.depth, "must be at least 1")
        heads("projector", enc.embed_dim, proj.num_heads, "encoder.embed_dim")
        need(proj.mlp_ratio > 0, "projector.mlp_ratio", proj.mlp_ratio, "must be positive")
        need(proj.norm_eps > 0, "projector.norm_eps", proj.norm_eps, "must be positive")
    need(text.kind in ("hf", "sentence", "none"), "text.kind", text.kind, "is not hf, sentence or none")
    if text.kind != "none":
        need(bool(text.name.strip()), "text.name", text.name, "is empty")
        need(text.pooling in ("cls", "mean"), "text.pooling", text.pooling, "is not cls or mean")
        need(text.width > 0, "text.width", text.width, "must be positive")
        need(text.max_length > 0, "text.max_length", text.max_length, "must be positive")
    need(cfg.init_temperature > 0, "init_temperature", cfg.init_temperature, "must be positive")
    need(cfg.max_logit_scale >= 1, "max_logit_scale", cfg.max_logit_scale, "must be at least 1")


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
    if isinstance(cfg, ModelCfg) and overrides:  # a bad override fails here, naming the field
        cfg = ModelCfg.from_dict(cfg.to_dict())
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
