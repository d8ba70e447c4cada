import sys
from pathlib import Path

# Test helpers (tests/imagefiles.py) are imported as top-level modules.
sys.path.insert(0, str(Path(__file__).parent))

# Loads the hypothesis profile before any test module counts its examples.
import profiles  # noqa: F401
