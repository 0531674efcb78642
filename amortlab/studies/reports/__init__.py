"""Report plug-ins: the reports a study lists under ``reports:``, written after the generic tables and plots.

An entry is a registered short name (REPORTS) or a mapping with ``_target_`` (the dotted path of a report class,
anywhere on the Python path) and its keyword arguments; both are built with ``hydra.utils.instantiate``, so a new
report needs no change here:

    reports: [methods, bound_vs_k]
    reports: [gaps, {_target_: my_pkg.reports.ElboTable, metric: test/neg_elbo}]
"""
from __future__ import annotations

from typing import Any

from hydra.utils import instantiate

from amortlab.studies.reports.base import Report
from amortlab.studies.spec import SweepError

# short name -> the dotted path of its class
REPORTS = {
    "gaps": "amortlab.studies.reports.gaps.GapsReport",
    "methods": "amortlab.studies.reports.methods.MethodsReport",
    "bound_vs_k": "amortlab.studies.reports.bound_vs_k.BoundVsKReport",
    "nll_vs_time": "amortlab.studies.reports.tradeoff.NLLvsTimeReport",
    "sequence": "amortlab.studies.reports.sequence.SequenceReport",
}


def build_reports(specs: list[str | dict[str, Any]], where: str = "reports") -> list[Report]:
    """The report objects of a study's ``reports:`` entries; ``where`` prefixes error messages (the study file)."""
    known = ", ".join(sorted(REPORTS))
    how = (f"Known reports: {known}; or a mapping {{_target_: package.module.Class, ...keyword arguments}} for a "
           f"report class of your own.")
    out: list[Report] = []
    for spec in specs:
        if isinstance(spec, str):
            if spec not in REPORTS:
                raise SweepError(f"{where}: unknown report '{spec}'. {how}")
            spec = {"_target_": REPORTS[spec]}
        elif not isinstance(spec, dict) or "_target_" not in spec:
            raise SweepError(f"{where}: report entry {spec!r} is neither a report name nor a mapping with "
                             f"_target_. {how}")
        try:
            report = instantiate(spec, _convert_="all")
        except Exception as e:  # noqa: BLE001  (Hydra wraps import and constructor errors in several types)
            raise SweepError(f"{where}: report {spec['_target_']} cannot be built: {' '.join(str(e).split())}. "
                             f"{how}") from None
        if not callable(getattr(report, "write", None)):
            raise SweepError(f"{where}: report {spec['_target_']} has no write(rows, out_dir) method.")
        out.append(report)
    return out

