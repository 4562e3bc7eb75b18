"""Analysis: what cp-onnx predicts from calibration texts alone. The paper's per-layer statistics and block
scores, activation Jacobians, head influence, Mahalanobis anomaly and the circuit graph, the default
prediction (each block duplicated, scored on the texts' digit tokens), the layer and head pruning
predictions, the memory budget checked before a run, and report.json, the versioned record of one analysis.
It runs graphs through ``cp_onnx.models``, reuses the sweep's evaluator and scoring (``cp_onnx.groundtruth``),
and never imports ``cp_onnx.outputs``.
"""
