"""Slicer-only helpers of the NormativeAnomaly module (Qt and the running application allowed here).

NormativeAnomaly.py stays the thin module file; each file here has one job:
``model_cards`` (model list and cards, read as JSON), ``dependencies`` (PyTorch/MONAI check,
device detection and installation, all in child processes), ``inputs_panel`` (the
model selector, its card and the diffusion settings it loads), ``run_panel`` (the Run
section and the dependency check), ``results_panel`` (results, thresholds, lesions and
export sections), ``sample_data`` (the demo case in the Sample Data module), ``self_test``
(the bodies of the module's self-tests, a mixin of NormativeAnomalyTest).

The background run itself is ``NormativeAnomalyLib.mrml.run_controller``, shared with the web app.
Nothing here imports torch or MONAI: they are only ever imported by the CLI child process.
"""
