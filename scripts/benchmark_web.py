"""Web app latency: from a threshold slider move in the browser to the updated axial image on screen.

Starts ``normative-anomaly serve`` on a free loopback port, opens it in Debian's Chromium
(Playwright), runs the default model on the demo case, then clicks the threshold slider at
alternating positions, each far enough from the last to change the segmentation (checked).
Each latency is measured in the page's clock, from the pointerdown on the slider to the load
of the next axial frame (a new image from the server). Between moves it waits for the views
to settle, as a user looking at the result would.

    python scripts/benchmark_web.py [--moves 20] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from NormativeAnomalyWeb.browser import (VIEWPORT, browser_available, browser_page, click_slider, run_model,
                                         segment_voxels, wait_for_quiet, web_server)

REPO = Path(__file__).resolve().parent.parent

TARGET_MS = 250.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--moves", type=int, default=20)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if not browser_available():
        print("benchmark_web: no /usr/bin/chromium (apt-get install chromium libosmesa6)", file=sys.stderr)
        return 1
    positions = [0.45, 0.2, 0.5, 0.25, 0.4, 0.15]  # each far from the last: a click on the thumb does not move it
    latencies, voxels = [], []
    with tempfile.TemporaryDirectory() as work:
        start = time.perf_counter()
        with web_server(Path(work)) as url, browser_page(url) as page:
            ready = time.perf_counter() - start
            run_model(page)
            wait_for_quiet(page, 0)
            for move in range(args.moves):
                # Settled: the 3D surface is rebuilt SURFACE_DELAY_S after a step, which redraws every view.
                wait_for_quiet(page, 0, quiet_ms=1500)
                before = segment_voxels(page)
                click_slider(page, "threshold-slider", positions[move % len(positions)])
                page.wait_for_function("window.__pointer !== null && (window.__frames[0] || [])"
                                       ".some(t => t > window.__pointer)", timeout=10_000)
                latencies.append(page.evaluate("window.__frames[0].find(t => t > window.__pointer) - window.__pointer"))
                page.wait_for_function(f"Number(document.querySelector('#lesion-summary').dataset.voxels) !== {before}",
                                       timeout=10_000)  # the move did change the segmentation
                voxels.append(segment_voxels(page))
    ordered = sorted(latencies)
    figures = {
        "moves": len(latencies), "median_ms": statistics.median(latencies),
        "p90_ms": ordered[int(0.9 * (len(ordered) - 1))], "max_ms": ordered[-1], "target_ms": TARGET_MS,
        "server_ready_s": ready, "viewport": VIEWPORT, "cpu_cores": os.cpu_count(),
        "segment_voxels_seen": sorted(set(voxels)),
    }
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        print(f"slider move -> updated axial image, {figures['moves']} moves, demo case, {os.cpu_count()} cores, "
              f"viewport {VIEWPORT['width']}x{VIEWPORT['height']}:")
        print(f"  median {figures['median_ms']:.0f} ms, p90 {figures['p90_ms']:.0f} ms, max {figures['max_ms']:.0f} ms "
              f"(target: median <= {TARGET_MS:.0f} ms)")
        print(f"  all: {', '.join(f'{x:.0f}' for x in latencies)}")
        print(f"  server up and first frame after {ready:.1f} s; segment sizes seen: {len(set(voxels))} distinct")
    return 0


if __name__ == "__main__":
    sys.exit(main())
