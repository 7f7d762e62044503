"""NormativeAnomaly in a browser: the Slicer module's MRML logic behind a trame-slicer page.

For teaching and quick reviews without installing Slicer. ``normative-anomaly serve`` starts
it. Each file has one job: ``server`` (the command's options and start-up), ``files``
(shared folders, uploads, the work folder), ``session`` (input, runs, results, thresholds:
the MRML layer's functions, no trame), ``views`` (trame-slicer's scene and server-side
rendered views), ``ui`` (the page), ``app`` (browser state <-> session).
"""
