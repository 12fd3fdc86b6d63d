"""Prompt templates for zero-shot classification: the paper's rules (Table VI), label clean-up, user templates
and prompt ensembles.

The rules reproduce EVAR's ``class_to_caption`` (the code behind the paper's Table VII): a dataset-specific
rewrite of the class name, then ``_`` -> space, then ``" can be heard"`` appended::

    AudioSet, FSD50K   "(labels) can be heard"                       /m/09x0r -> "Speech can be heard"
    ESC-50, US8K       "(label) can be heard"                         dog_bark -> "dog bark can be heard"
    CREMA-D            six fixed sentences                            ANG -> "angry person talking can be heard"
    GTZAN              "(label) music can be heard"                   hiphop -> "hiphop music can be heard"
    NSynth             "the musical instrument sound of (label) can be heard"

A *template* is either one of these rule names or a format string with one ``{}`` or ``{label}`` field
(``"the sound of {label}"``); the label is cleaned first (display name for an AudioSet MID, ``_`` -> space).
A list of templates is a prompt ensemble: the normalised text embeddings of every template are averaged per
class and renormalised (CLIP/open_clip's ``build_zero_shot_classifier``). EVAR uses a single template.
"""

from __future__ import annotations

import csv
import string
from pathlib import Path
from typing import Callable, Mapping, Sequence, Union

import torch
import torch.nn.functional as F

SUFFIX = " can be heard"

# CREMA-D emotion codes -> EVAR's sentences (the paper's Table VI, in the code order ANG DIS FEA HAP NEU SAD)
CREMAD_SENTENCES: dict[str, str] = {
    "ANG": "angry person talking",
    "DIS": "someone talking in disgust",
    "FEA": "someone talking with a sense of fear",
    "HAP": "someone talking happily and joyfully",
    "NEU": "someone talking calmly",
    "SAD": "someone talking sadly",
}
# CREMA-D codes -> plain words, for user templates ("a {label} voice")
CREMAD_NAMES: dict[str, str] = {
    "ANG": "angry",
    "DIS": "disgusted",
    "FEA": "fearful",
    "HAP": "happy",
    "NEU": "neutral",
    "SAD": "sad",
}


def _plain(label: str) -> str:
    return label


# rule name -> rewrite of the (display-name-mapped) label before "_" -> space and the suffix
_REWRITES: dict[str, Callable[[str], str]] = {
    "default": _plain,
    "audioset": _plain,
    "fsd50k": _plain,
    "esc50": _plain,
    "us8k": _plain,
    "manifest": _plain,
    "gtzan": lambda c: c + " music",
    "nsynth": lambda c: "the musical instrument sound of " + c,
    "cremad": lambda c: _cremad_sentence(c),
}
RULES: tuple[str, ...] = tuple(_REWRITES)

Template = Union[str, Sequence[str]]  # a rule name or a format string, or a list of them (an ensemble)


class TemplateError(ValueError):
    """A template that cannot be used: an unknown rule or a format string without exactly one label field."""


def _cremad_sentence(code: str) -> str:
    """An emotion code (``ANG``) or its word (``angry``, from ``CREMAD_NAMES``) -> EVAR's sentence."""
    key = code.strip().upper()
    key = {v: k for k, v in CREMAD_NAMES.items()}.get(code.strip().lower(), key)
    if key not in CREMAD_SENTENCES:
        raise TemplateError(
            f"CREMA-D rule: unknown emotion code {code!r}; expected one of {', '.join(CREMAD_SENTENCES)}"
        )
    return CREMAD_SENTENCES[key]


# ----------------------------------------------------------------------------------------------- labels


def read_class_labels_indices(path: str | Path) -> list[tuple[str, str]]:
    """AudioSet's ``class_labels_indices.csv`` (``index,mid,display_name``) -> ``[(mid, display_name)]`` in
    index order. Raises ValueError naming the file and line for a malformed row."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no such file (AudioSet's class_labels_indices.csv; get it from "
            "http://storage.googleapis.com/us_audioset/youtube_corpus/v1/csv/"
            "class_labels_indices.csv)"
        )
    out: list[tuple[int, str, str]] = []
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = [h.strip() for h in next(reader, [])]
        need = ("index", "mid", "display_name")
        if any(col not in header for col in need):
            raise ValueError(f"{path}, line 1: expected the columns index,mid,display_name; got {','.join(header)}")
        cols = [header.index(c) for c in need]
        for row in reader:
            line = reader.line_num
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                raise ValueError(
                    f"{path}, line {line}: {len(row)} field(s), the header has {len(header)} "
                    "(is a display name with a comma unquoted?)"
                )
            index, mid, name = (row[c].strip() for c in cols)
            try:
                out.append((int(index), mid, name))
            except ValueError:
                raise ValueError(f"{path}, line {line}: index {index!r} is not an integer") from None
    return [(mid, name) for _, mid, name in sorted(out)]


def clean_label(label: str, names: Mapping[str, str] | None = None) -> str:
    """A label as text: its display name if ``names`` maps it (AudioSet MIDs), then ``_`` -> space, stripped."""
    if names is not None:
        label = names.get(label, label)
    return label.replace("_", " ").strip()


# ----------------------------------------------------------------------------------------------- templates


def _field(template: str) -> str:
    """The one replacement field of a format-string template: ``""`` for ``{}``, ``"label"`` for ``{label}``."""
    if not isinstance(template, str):
        raise TemplateError(f"a template must be a string, got {type(template).__name__}")
    try:
        fields = [(f, spec, conv) for _, f, spec, conv in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise TemplateError(f"template {template!r}: {e} (write a literal brace as {{{{ or }}}})") from None
    if len(fields) != 1 or fields[0][0] not in ("", "label") or fields[0][1] or fields[0][2]:
        raise TemplateError(
            f"template {template!r}: expected a rule name ({', '.join(RULES)}) or a format "
            "string with exactly one '{}' or '{label}' field, e.g. 'the sound of {label}'"
        )
    return fields[0][0]


def check_template(template: str) -> str:
    """Return ``template`` if it is a rule name or a format string with exactly one ``{}``/``{label}``."""
    if isinstance(template, str) and template in _REWRITES:
        return template
    _field(template)
    return template


def make_prompt(label: str, template: str = "default", names: Mapping[str, str] | None = None) -> str:
    """The prompt for one class.

    A rule name applies the paper's rule (EVAR ``class_to_caption``): map the label through ``names``, apply
    the rule's rewrite, replace ``_`` by spaces and append " can be heard". A format string gets the cleaned
    label (``clean_label``); for CREMA-D codes pass ``names=CREMAD_NAMES`` to get words.
    """
    if template in _REWRITES:
        mapped = names.get(label, label) if names is not None else label
        return _REWRITES[template](mapped).replace("_", " ") + SUFFIX
    text = clean_label(label, names)
    return template.format(text) if _field(template) == "" else template.format(label=text)


def as_template_list(template: Template | None, default: str = "default") -> list[str]:
    """One template or a list of them -> a checked, non-empty list (``None`` -> ``[default]``)."""
    if template is None:
        templates = [default]
    elif isinstance(template, str):
        templates = [template]
    else:
        templates = list(template)
    if not templates:
        raise TemplateError("an empty list of templates")
    return [check_template(t) for t in templates]


def make_prompts(
    labels: Sequence[str], template: Template | None = None, names: Mapping[str, str] | None = None
) -> list[list[str]]:
    """Prompts per class: ``out[c][k]`` is class ``c`` under template ``k``."""
    templates = as_template_list(template)
    return [[make_prompt(lab, t, names) for t in templates] for lab in labels]


@torch.no_grad()
def encode_prompts(model, prompts: Sequence[Sequence[str]]) -> torch.Tensor:
    """Class text embeddings (C, D) from prompts per class (C lists of K prompts).

    Each prompt's CLAP text embedding is L2-normalised, the K embeddings of a class are averaged and the mean
    is renormalised (the prompt ensemble of CLIP/open_clip); with K = 1 it is the plain normalised embedding.
    """
    if not prompts:
        raise ValueError("no classes to encode")
    k = len(prompts[0])
    if any(len(p) != k for p in prompts):
        raise ValueError("every class needs the same number of prompts")
    flat = [p for per_class in prompts for p in per_class]  # class-major: (C * K)
    emb = model.encode_text(flat, normalize=True).float()  # (C*K, D)
    emb = emb.reshape(len(prompts), k, -1).mean(dim=1)  # (C*K, D) -> (C, K, D) -> (C, D)
    return F.normalize(emb, dim=-1)
