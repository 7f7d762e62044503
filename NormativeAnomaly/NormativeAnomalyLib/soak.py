"""Many consecutive analyses in one process, and the memory they leave behind.

Python API users (a notebook, a service calling ``detect_anomalies`` + ``write_outputs``) and
the web front end run analyses in one long-lived process (the Slicer module starts a child per
run). ``soak`` repeats one such analysis and reads the resident set size after a warm-up (torch's
allocator, oneDNN's kernel cache and the first imports settle there) and at the end; optionally
the Python heap's growth (tracemalloc). scripts/soak.py and Testing/core/test_soak.py report it.
"""

from __future__ import annotations

import gc
import resource
import shutil
import sys
import tempfile
import time
import tracemalloc
from dataclasses import dataclass
from pathlib import Path
from typing import Callable


@dataclass
class SoakFigures:
    runs: int
    warmup: int
    seconds_per_run: float  # after the warm-up
    rss_after_warmup_mb: float
    rss_end_mb: float
    heap_growth_mb: float | None  # Python objects (tracemalloc), None unless asked for

    @property
    def growth_mb(self) -> float:
        return self.rss_end_mb - self.rss_after_warmup_mb

    @property
    def growth_per_run_mb(self) -> float:
        return self.growth_mb / max(self.runs - self.warmup, 1)

    def lines(self) -> list[str]:
        heap = "" if self.heap_growth_mb is None else f"; Python heap growth {self.heap_growth_mb:+.2f} MB"
        return [f"runs: {self.runs} (warm-up {self.warmup}), {self.seconds_per_run:.2f} s per run",
                f"RSS after warm-up {self.rss_after_warmup_mb:.1f} MB, at the end {self.rss_end_mb:.1f} MB",
                f"growth after warm-up {self.growth_mb:+.1f} MB, {self.growth_per_run_mb:+.3f} MB per run{heap}"]


def rss_mb() -> float:
    """The process's resident memory now (Linux), or its peak where /proc is missing; after a full collection."""
    gc.collect()
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def analysis(model: str, input_path: Path | None, device: str) -> Callable[[], None]:
    """One front-end analysis as a function: load the package, run, write the outputs, delete them."""
    from .models import resolve_model
    from .outputs import write_outputs
    from .pipeline import RunOptions, detect_anomalies
    from .volume_io import read_volume

    def run() -> None:
        package = resolve_model(model)
        image = read_volume(input_path) if input_path else package.template.image
        result = detect_anomalies(image, package, RunOptions(device=device, registered=input_path is None))
        out = Path(tempfile.mkdtemp(prefix="soak-"))
        try:
            write_outputs(result, out / "run", {"model": model})
        finally:
            shutil.rmtree(out, ignore_errors=True)
    return run


def soak(run: Callable[[], None], runs: int, warmup: int, heap: bool = False,
         progress: Callable[[int], None] | None = None) -> SoakFigures:
    """``run`` ``runs`` times; memory read after ``warmup`` runs and at the end."""
    if not 0 <= warmup < runs:
        raise ValueError(f"warm-up ({warmup}) must be less than the runs ({runs})")
    for _ in range(warmup):
        run()
    rss_after_warmup = rss_mb()
    if heap:
        tracemalloc.start()
        heap_start = tracemalloc.get_traced_memory()[0]
    start = time.perf_counter()
    for index in range(warmup, runs):
        run()
        if progress is not None:
            progress(index + 1)
    seconds = (time.perf_counter() - start) / (runs - warmup)
    heap_growth = None
    if heap:
        gc.collect()
        heap_growth = (tracemalloc.get_traced_memory()[0] - heap_start) / (1 << 20)
        tracemalloc.stop()
    return SoakFigures(runs, warmup, seconds, rss_after_warmup, rss_mb(), heap_growth)
