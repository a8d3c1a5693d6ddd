"""The otseg benchmark (SPEC section 4): every available otseg backend and the
peers (POT, torch.compile) on the OTSeg problem sizes, timed against the
reference in the same process.

Run it with ``otseg bench`` (``otseg bench --help``); ``bench/README.md``
explains the columns and the results file.

- ``generators``: the cases, score generators and iteration modes.
- ``measure``: timing and peak-memory measurement.
- ``harness``: the methods under test and the run over cases.
- ``report``: the printed/markdown table, the results file and the plot.
"""

from .harness import run

__all__ = ["run"]
