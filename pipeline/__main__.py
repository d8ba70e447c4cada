"""``python -m pipeline`` runs the tileseg command line."""

import sys

from pipeline.cli import main

sys.exit(main())
