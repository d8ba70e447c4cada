"""``python -m pipeline`` runs the tileseg command line."""

import sys

from pipeline.cli.main import main

sys.exit(main())
