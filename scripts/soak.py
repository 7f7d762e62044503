#!/usr/bin/env python3
"""Many consecutive runs in one process: memory must not grow from run to run.

Who runs analyses in one long-lived process: not the Slicer module, which starts each
analysis as a child process (NormativeAnomalySlicer/run_controller.py -> background.BackgroundRun
-> ``normative-anomaly run``), so torch's memory goes away with the child. Python API users (a
notebook, a service calling ``detect_anomalies`` + ``write_outputs``) and the web front end do:
that is what this soak reproduces. Each run loads the model package (as a front end does per
analysis), runs ``detect_anomalies``, writes the outputs into a temporary folder and deletes it.

Memory: resident set size (VmRSS of /proc/self/status; elsewhere the peak, ru_maxrss) after
``--warmup`` runs (torch's allocator, oneDNN's kernel cache and the first imports settle there)
and after the last run; growth per run = (end - after warm-up) / (runs - warm-up). With
``--tracemalloc`` the Python heap's growth over the same runs too (slower).

Default case: the model's own template as the input, already in template space (registered,
so no registration): the runs exercise loading, inference, scoring, mapping back and writing,
and the default 100 finish in minutes on 2 cores.

    python scripts/soak.py [--runs 100] [--warmup 5] [--model dae-t1] [--input FILE] [--device cpu]
                           [--max-growth-mb 50] [--tracemalloc]

Exit status 1 if the RSS grew by more than --max-growth-mb after the warm-up.
"""

from __future__ import annotations

import argparse
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

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "NormativeAnomaly"))

MAX_GROWTH_MB = 50.0  # total RSS growth allowed after the warm-up: a leak of 0.5 MB a run over 100 runs


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
    from NormativeAnomalyLib.models import resolve_model
    from NormativeAnomalyLib.outputs import write_outputs
    from NormativeAnomalyLib.pipeline import RunOptions, detect_anomalies
    from NormativeAnomalyLib.volume_io import read_volume

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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--model", default="dae-t1", help="registered name or package folder")
    parser.add_argument("--input", type=Path, help="a volume to register and analyse (default: the model's template)")
    parser.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda", "mps"])
    parser.add_argument("--max-growth-mb", type=float, default=MAX_GROWTH_MB)
    parser.add_argument("--tracemalloc", action="store_true", help="also measure the Python heap's growth (slower)")
    parser.add_argument("--every", type=int, default=10, help="print the RSS every this many runs (0: never)")
    args = parser.parse_args()

    def progress(done: int) -> None:
        if args.every and done % args.every == 0:
            print(f"  run {done}: RSS {rss_mb():.1f} MB", flush=True)

    import torch

    print(f"soak: {args.model} on {args.input or 'its template (registered)'}, device {args.device}, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads)", flush=True)
    figures = soak(analysis(args.model, args.input, args.device), args.runs, args.warmup, args.tracemalloc, progress)
    print("\n".join(figures.lines()))
    if figures.growth_mb > args.max_growth_mb:
        print(f"FAILED: RSS grew {figures.growth_mb:.1f} MB after the warm-up (bound {args.max_growth_mb:.0f} MB)")
        return 1
    print(f"ok: growth within {args.max_growth_mb:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
