"""``python -m captioning.metrics``."""

import sys

from captioning.metrics.cli import main

sys.exit(main())
