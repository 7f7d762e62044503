"""Progress reporting and cancellation shared by every stage.

A stage reports ``(stage, fraction)`` and checks for cancellation between units of work
(registration levels, inference batches), so a Slicer or web front end can show a bar and
stop a run without killing the process.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .errors import Cancelled

ProgressCallback = Callable[[str, float], None]
CancelCheck = Callable[[], bool]


@dataclass
class Monitor:
    progress: ProgressCallback | None = None
    cancel: CancelCheck | None = None

    def report(self, stage: str, fraction: float) -> None:
        if self.progress is not None:
            self.progress(stage, min(max(fraction, 0.0), 1.0))

    def check(self) -> None:
        if self.cancel is not None and self.cancel():
            raise Cancelled("cancelled by the user; nothing was written")
