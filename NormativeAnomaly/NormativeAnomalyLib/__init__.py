"""NormativeAnomalyLib: the Slicer-free core of NormativeAnomaly.

One module per pipeline stage (see docs/architecture.md):
``volume_io`` reading and validation, ``registration`` alignment to the model's template,
``model_space`` masking/normalisation/resampling, ``inference`` the network pass,
``scoring`` anomaly maps and calibrated thresholds, ``lesions`` thresholding and the
lesion table, ``outputs`` writing results (``run_folder``: the files' names, the folder's lock,
reading a run back), ``pipeline`` the orchestration, ``cli`` the
command-line tool, ``background`` the CLI as a child process for GUIs. Nothing here imports
Slicer or Qt, except ``mrml/``: results as MRML nodes and live thresholds, which needs MRML
only (3D Slicer or the ``slicer-core`` package), never Qt.
"""

__version__ = "0.1.0"
