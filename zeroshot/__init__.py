"""Zero-shot audio classification with M2D-CLAP (paper section IV-C1, Tables VI and VII).

    import m2dclap
    from zeroshot import ZeroShotClassifier, read_zeroshot_dataset

    model = m2dclap.load("runs/default/stage2/model")
    clf = ZeroShotClassifier.from_labels(model, ["dog", "rain", "siren"])   # "dog can be heard", ...
    probs = clf.predict(m2dclap.load_audio("dog.wav", model.sample_rate))  # (1, 3)

    python -m zeroshot.evaluate --checkpoint C --dataset esc50 --root ESC-50-master --out esc50.json
    python -m zeroshot.classify a.wav b.wav --checkpoint C --labels "dog,rain,siren" --top 3

Uses only the public model API (``encode_audio``, ``encode_text``, ``sample_rate``, ``load_audio``).
"""

from .classifier import FilePredictions, ZeroShotClassifier
from .datasets import DATASETS, Clip, DatasetError, ZeroShotDataset, read_zeroshot_dataset
from .metrics import accuracy, average_precision, confusion_matrix, mean_average_precision
from .templates import (
    CREMAD_SENTENCES,
    RULES,
    TemplateError,
    clean_label,
    encode_prompts,
    make_prompt,
    make_prompts,
    read_class_labels_indices,
)

__all__ = [
    "CREMAD_SENTENCES",
    "Clip",
    "DATASETS",
    "DatasetError",
    "FilePredictions",
    "RULES",
    "TemplateError",
    "ZeroShotClassifier",
    "ZeroShotDataset",
    "accuracy",
    "average_precision",
    "clean_label",
    "confusion_matrix",
    "encode_prompts",
    "read_zeroshot_dataset",
    "make_prompt",
    "make_prompts",
    "mean_average_precision",
    "read_class_labels_indices",
]
