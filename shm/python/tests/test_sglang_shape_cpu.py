#!/usr/bin/env python3
"""test_gpu_sglang_shape.py's whole scenario on the CPU (`--cpu`): libattnx-export-graph's kernels emulated by
host_graph.py, the engine's tensors as host buffers of the segment, CPU torch, the reference consumer computing in
place. Exit 77 without torch. Catches what is not CUDA: the hook's arguments (it found SGLang decode rows all
exporting row 0's Q), the test's own expectations, the consumer's waits. scripts/gpu-test and meson run it."""
import os
import runpy
import sys

sys.argv = [sys.argv[0], "--cpu"]
runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "test_gpu_sglang_shape.py"),
               run_name="__main__")
