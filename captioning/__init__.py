"""EnCLAP-style audio captioning: codec/CLAP preprocessing, the BART captioner, training, decoding, evaluation
and the caption metrics (``captioning.preprocess``, ``.model``, ``.train``, ``.caption``, ``.evaluate``,
``.metrics``, ``.fense``)."""
