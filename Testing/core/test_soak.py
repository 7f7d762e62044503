"""Runs in one long-lived process (Python API, web front end) must not grow its memory.

A shorter form of ``scripts/soak.py`` (both run ``NormativeAnomalyLib.soak``): the tiny trained DAE, loaded per run as a front end
does, on the template (registered), 15 runs with outputs written and deleted each time.
"""

from __future__ import annotations

import pytest

from NormativeAnomalyLib import soak

RUNS, WARMUP = 15, 5
# After the warm-up the RSS stays flat within tens of MB (allocator arenas); a leak of a
# reconstruction per run (3.9 MB: 96x112x96 float32) would add 39 MB over these 10 runs.
MAX_GROWTH_MB = 30.0


@pytest.mark.slow  # about 2 minutes on 2 shared cores (a run is ~8 s: scoring, mapping back, report.png)
@pytest.mark.reliability
def test_fifteen_runs_in_one_process_do_not_grow_memory(trained_dae, reliability_case):
    figures = soak.soak(soak.analysis(str(trained_dae.path), None, "cpu"), RUNS, WARMUP)
    print("\n".join(figures.lines()))
    assert figures.growth_mb <= MAX_GROWTH_MB
    reliability_case("fault", f"soak: {RUNS} runs in one process (load model, run, write outputs, delete)",
                     "; ".join(figures.lines()))
