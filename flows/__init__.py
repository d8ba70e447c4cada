"""Orchestration of directory runs over the tileseg library (see flows/README.md).

``flows.core`` and ``flows.cluster`` need no Prefect (``tileseg batch``); only
``flows.segment_flows`` (the Prefect flow and task) and ``tileseg serve`` import it. Importing
this package must stay cheap: the ``tileseg`` CLI loads ``flows.cli`` for every command.
"""
