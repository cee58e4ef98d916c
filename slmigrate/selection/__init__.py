"""Step S4 of the paper: pick candidate small models for each task.

``run.select`` ranks the catalogue's models (``slmigrate.catalog``, sizes from ``catalog.footprint``) for each
cluster by what fits the hardware, the licence and the task, and writes ``selection.json``.
"""

from slmigrate.selection.run import SelectResult, load_selection, select

__all__ = ["SelectResult", "load_selection", "select"]
