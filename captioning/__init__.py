"""Audio captioning: caption metrics (``captioning.metrics``)."""
