"""Graph analysis and surgery on ONNX models.

Depends on onnx and numpy, and on :mod:`dsc_export.ort` (onnxruntime sessions) where a model must
run: shape probes and float16 activation ranges. Never on ``backends``, ``serving`` or the CLI;
``tests/test_layers.py`` fails on any import cycle in the package.

- :mod:`.model`   loading with clear errors, the data-flow view, constant folding of shape arithmetic
- :mod:`.shapes`  exact per-sample sizes of tensors (static inference, else one recorded run)
- :mod:`.cuts`    cut points by dominance, bytes and ratios, natural and compressive bottlenecks (``compressive_mask``)
- :mod:`.surgery` head/tail extraction, wire casts, numerical verification
- :mod:`.precision` float16 conversion under the ONNX type constraints
"""
