"""Ground truth: what really happens when a block is duplicated or removed, measured on probe suites with known
answers. The probe suites and general text, teacher-forced scoring, the zero-shot and few-shot prompting regimes,
the brute-force sweep over every block, and the validation of each method's predictions against it. It runs
graphs through ``cp_onnx.models``, takes the candidate blocks and report.json helpers from ``cp_onnx.analysis``
(whose default and pruning predictions in turn reuse the sweep's evaluator), and never imports ``cp_onnx.outputs``.
"""
