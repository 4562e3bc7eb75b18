"""Models: model folders and running them. An exported (or onnxruntime-genai) folder as cp-onnx opens it, the
onnxruntime runner, greedy generation, and the folders ``cp-onnx apply`` writes along a layer path. The lowest
stage: it imports none of analysis, ground truth or outputs.
"""
