#!/bin/bash
# GPU checks for a lent machine that has CUDA torch, onnx and CPU onnxruntime but nothing of ours:
# pure-Python test dependencies and cuda-bindings wheels travel in .gpu-carry/ (see
# benchmarks/README.md). Runs the gpu-marked tests (cuda-python memory, pinned staging, streams,
# events; NVML), the profiling harness on onnxruntime and the TensorRT backend's tests on its
# doubles (their CUDA double checked against the real bindings), and prints the machine.
# Every step has a time limit; the whole stays under 5 minutes. Changes no GPU setting.
set -u
T="timeout 120"
PY=$(command -v python3 || command -v python)
echo "== machine"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,compute_cap --format=csv,noheader
$PY --version
$PY -c "import torch, onnx, onnxruntime, numpy; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| onnx', onnx.__version__, '| onnxruntime', onnxruntime.__version__, '| numpy', numpy.__version__)"
export PYTHONPATH="$PWD:$PWD/.gpu-carry/site"
if ! $PY -c "import cuda.bindings.runtime" 2>/dev/null; then
  tag=$($PY -c "import sys; print(f'cp{sys.version_info[0]}{sys.version_info[1]}')")
  mkdir -p /tmp/dsc-pk
  for w in .gpu-carry/wheels/cuda_bindings-*-"$tag"-*.whl .gpu-carry/wheels/cuda_pathfinder-*.whl; do
    [ -f "$w" ] && $PY -m zipfile -e "$w" /tmp/dsc-pk
  done
  export PYTHONPATH="$PYTHONPATH:/tmp/dsc-pk"
  echo "cuda.bindings: from the carried wheel ($tag)"
fi
$PY -c "from cuda.bindings import runtime as r; print('cuda.bindings runtime', r.cudaRuntimeGetVersion()[1], 'driver', r.cudaDriverGetVersion()[1])"
$PY -c "from dsc_export.backends.cuda import no_device_reason; print('CUDA devices:', no_device_reason() or 'visible')"
echo "== gpu tests"
$T $PY -m pytest -q -p no:cacheprovider -rs tests/test_gpu.py 2>&1 | tail -8
echo "== tensorrt backend on its doubles"
$T $PY -m pytest -q -p no:cacheprovider -rs tests/test_tensorrt_backend.py 2>&1 | tail -4
echo "== profiling harness on onnxruntime"
$T $PY -m pytest -q -p no:cacheprovider -rs tests/test_profiling.py tests/test_precision.py 2>&1 | tail -8
echo "== host info as a profile records it"
$PY -c "import json; from dsc_export.profiling import host_info; print(json.dumps(host_info(None, 'tensorrt'), indent=1))"
$PY -m dsc_export build --help | head -2
