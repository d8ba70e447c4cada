"""Orchestration of directory runs over the tileseg library (see flows/README.md).

``flows.core`` and ``flows.cluster`` need no Prefect (``tileseg batch``); only
``flows.segment_flows`` (the Prefect flow and task) and ``tileseg serve`` import it. Importing
this package must stay cheap: the ``tileseg`` CLI loads ``flows.cli`` for every command.
"""

import os

# Prefect's temporary server (a flow run without PREFECT_API_URL) gets 20 s by default to start,
# too few for its first start on a fresh PREFECT_HOME (database migrations) on a busy node.
# Read once, when Prefect is first imported; a value in the environment wins.
EPHEMERAL_STARTUP_TIMEOUT = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
os.environ.setdefault(EPHEMERAL_STARTUP_TIMEOUT, "120")
