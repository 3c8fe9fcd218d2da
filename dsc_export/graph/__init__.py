"""Graph analysis and surgery on ONNX models (depends on onnx only).

- :mod:`.model`   loading with clear errors, the data-flow view, constant folding of shape arithmetic
- :mod:`.shapes`  exact per-sample sizes of tensors (static inference, else one recorded run)
- :mod:`.cuts`    cut points by dominance, bytes and ratios, natural and compressive bottlenecks (Eq. 3)
- :mod:`.surgery` head/tail extraction, wire casts, numerical verification
"""
