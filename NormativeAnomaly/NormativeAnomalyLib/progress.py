"""Progress reporting and cancellation shared by every stage.

A stage reports ``(stage, fraction)`` and checks for cancellation between units of work
(registration levels, inference batches), so a Slicer or web front end can show a bar and
stop a run without killing the process.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

from .errors import Cancelled

ProgressCallback = Callable[[str, float], None]
CancelCheck = Callable[[], bool]
NoticeCallback = Callable[[str], None]


@dataclass
class Monitor:
    progress: ProgressCallback | None = None
    cancel: CancelCheck | None = None
    on_notice: NoticeCallback | None = None

    def notice(self, message: str) -> None:
        """One line for the user about something the run did differently (e.g. a GPU out of memory
        fell back to the CPU); the run goes on. Without a callback it is logged as a warning."""
        if self.on_notice is not None:
            self.on_notice(message)
        else:
            logging.getLogger("NormativeAnomaly").warning(message)

    def report(self, stage: str, fraction: float) -> None:
        if self.progress is not None:
            self.progress(stage, min(max(fraction, 0.0), 1.0))

    def cancelled(self) -> bool:
        return self.cancel is not None and bool(self.cancel())

    def check(self) -> None:
        if self.cancelled():
            raise Cancelled("cancelled by the user; nothing was written")


# The pipeline's stages in order, with their rough share of a run's time on a CPU
# (scripts/benchmark_run.py), so one bar can show the whole run.
STAGE_SHARES = (("registration", 0.45), ("model_space", 0.08), ("inference", 0.30), ("scoring", 0.05),
                ("to_input_grid", 0.07), ("segmentation", 0.02), ("writing", 0.03))


def overall_fraction(stage: str, fraction: float) -> float:
    """Fraction of the whole run done when ``stage`` is ``fraction`` done.

    "done" (the pipeline's end) comes before "writing" (the CLI's outputs)."""
    if stage == "done":
        stage, fraction = "writing", 0.0
    done = 0.0
    for name, share in STAGE_SHARES:
        if name == stage:
            return min(done + share * min(max(fraction, 0.0), 1.0), 1.0)
        done += share
    return 0.0
