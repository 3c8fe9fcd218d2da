"""Execution backends. For now the embedded default, onnxruntime on the CPU (see
:mod:`dsc_export.backends.onnxruntime`); the engine interface and TensorRT come with the
engines stage."""
