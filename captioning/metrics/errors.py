"""What the caption-metric modules share: the error for a metric that cannot run here, and how to fix it."""

from __future__ import annotations

DOWNLOAD_COMMAND = "python -m captioning.metrics download"


class MetricUnavailableError(RuntimeError):
    """A metric cannot run on this machine (missing Java, jar or model file)."""
