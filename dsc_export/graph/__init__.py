"""Graph analysis and surgery on ONNX models.

Depends on onnx and numpy; only :mod:`.probe` runs a model (onnxruntime, through
:mod:`dsc_export.ort`). Never on ``inputs``, ``backends``, ``serving`` or the CLI: sample inputs
come from the caller. ``tests/test_layers.py`` fails on any import cycle in the package.

- :mod:`.model`      loading with clear errors, the data-flow view, the one topological sort
                     (:func:`~.model.topological_order`), the one has-subgraph check
- :mod:`.signature`  input signature and batch dimension, the one static-inference wrapper
                     (:func:`~.signature.infer_types`)
- :mod:`.probe`      the runs: tensors recorded from onnxruntime, activation runs for float16
- :mod:`.arithmetic` shape arithmetic evaluated per probe batch size without running the model
- :mod:`.folding`    folding of static shape arithmetic, one read of the batch size, dead nodes
- :mod:`.shapes`     exact per-sample sizes of tensors (static inference, else one run)
- :mod:`.cuts`       cut points by dominance, bytes and ratios, natural and compressive
                     bottlenecks (``compressive_mask``)
- :mod:`.surgery`    head/tail extraction, wire casts, structure checks
- :mod:`.precision`  float16 conversion under the ONNX type constraints

Numerical verification of parts against the whole model is :mod:`dsc_export.splitting`'s.
"""
