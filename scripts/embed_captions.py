"""Pre-compute caption embeddings for stage-1 pretraining; the command is m2dclap.embed_captions.

python scripts/embed_captions.py MANIFEST --out capemb.npy [--model all-MiniLM-L6-v2 | nvidia/NV-Embed-v2]
"""

import sys

from m2dclap.embed_captions import main

if __name__ == "__main__":
    sys.exit(main())
