"""Outputs: what cp-onnx shows and writes from a report. The one-line decision, the printed summary, the PNG
plots and the HTML page, the circuit summary embedded in an ONNX model's metadata, the pruning section, and the
pruned model folder of ``cp-onnx prune``. Outputs read ``cp_onnx.analysis`` and ``cp_onnx.groundtruth``;
nothing there imports them.
"""
