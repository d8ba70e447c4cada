"""Hypothesis profiles: ``ci``, the full example counts, and ``dev``, fewer, for the fast loop.

``HYPOTHESIS_PROFILE`` selects one (default ``ci``). Importing this module loads it; conftest.py
does so before any test module is imported, so :func:`examples` sees the profile in force.
"""

from __future__ import annotations

import os

from hypothesis import settings

__all__ = ["examples"]

# ci keeps hypothesis' default count, so a test without its own count runs as it always did.
CI_EXAMPLES = 100

# Not derandomized: each CI run tries new draws (a fixed set would be the only one it ever
# tries); a failure prints the blob that reproduces it.
settings.register_profile("ci", max_examples=CI_EXAMPLES, print_blob=True)
settings.register_profile("dev", max_examples=CI_EXAMPLES // 5)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def examples(ci_count: int) -> int:
    """The number of examples for a test that runs ``ci_count`` under the ``ci`` profile.

    Parameters
    ----------
    ci_count
        The test's own count in CI, where it deliberately differs from the profile's.

    Returns
    -------
    int
        ``ci_count`` scaled by the loaded profile's share of the ``ci`` count; at least 1.
    """
    return max(1, round(ci_count * settings.default.max_examples / CI_EXAMPLES))
