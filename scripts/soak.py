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
import sys
from pathlib import Path

from NormativeAnomalyLib.options import DEVICES
from NormativeAnomalyLib.soak import analysis, rss_mb, soak


MAX_GROWTH_MB = 50.0  # total RSS growth allowed after the warm-up: a leak of 0.5 MB a run over 100 runs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--model", default="dae-t1", help="registered name or package folder")
    parser.add_argument("--input", type=Path, help="a volume to register and analyse (default: the model's template)")
    parser.add_argument("--device", default="cpu", choices=DEVICES)
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
