import os
import sys
from pathlib import Path

import pytest

# Test helpers (tests/imagefiles.py) are imported as top-level modules.
sys.path.insert(0, str(Path(__file__).parent))

# Loads the hypothesis profile before any test module counts its examples.
import profiles  # noqa: F401


@pytest.fixture(autouse=True)
def _environment_kept():
    """Each test leaves the process environment as it found it: Dask's nanny writes its
    workers' variables (OMP_NUM_THREADS=1, ...) into the parent's ``os.environ``, and the
    clusters, workers and children of later tests would start with them."""
    saved = dict(os.environ)
    yield
    if os.environ != saved:
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture
def model_config():
    """The architecture of the ``model`` fixture; a test module overrides it for another."""
    # Imported here, not above: test modules without a model need not import torch.
    from pipeline.models import UNetConfig

    return UNetConfig(depth=2, width=4, padding="same", classes=2)


@pytest.fixture
def model(tmp_path, model_config) -> str:
    """A seeded U-Net of ``model_config`` saved as a model file in ``tmp_path``: its path."""
    from pipeline.models import save_unet, seeded_unet

    path = tmp_path / "model.safetensors"
    save_unet(seeded_unet(model_config, seed=0), path)
    return str(path)
