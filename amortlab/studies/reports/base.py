"""The interface of a report plug-in."""
from __future__ import annotations

from pathlib import Path
from typing import Any


class Report:
    """A report of one kind of study: ``write(rows, out_dir)`` writes its files into ``out_dir`` from the collected
    rows (amortlab.studies.collect.collect) and returns {file name: path}, empty when the rows have nothing for it.
    A plug-in given by ``_target_`` need not subclass this; it needs a ``write`` method of this signature."""

    name = "report"

    def write(self, rows: list[dict[str, Any]], out_dir: Path) -> dict[str, Path]:
        raise NotImplementedError
