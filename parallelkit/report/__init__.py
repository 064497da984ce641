"""The comparison report of a sweep: ``python -m parallelkit.report DIR`` (``__main__.py``)."""
from parallelkit.report.compare import write_report

__all__ = ["write_report"]
