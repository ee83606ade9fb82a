"""attnx: export an engine's queries and keys to attnx-capture (DESIGN §2).

attnx.export   — the segment, host buffers, requests and steps (libattnx-export; standard library only)
attnx.consumer — the capture-side view, for tests and diagnostics
attnx.cuda     — torch tensors as CUDA IPC / VMM buffer entries (needs torch)
attnx.graph    — graph-safe per-step export kernels (libattnx-export-graph; needs torch and a GPU)
attnx.hf       — the Hugging Face transformers attention hook
attnx.sglang_hook — the SGLang --forward-hooks module
"""
from ._ffi import AttnxError, DEFAULT_NAME  # noqa: F401
from .export import (Exporter, HostBuffer, block_size, block_table_desc, layer_list, make_buffer,  # noqa: F401
                     paged_kpool_desc)

__all__ = ["AttnxError", "DEFAULT_NAME", "Exporter", "HostBuffer", "block_size", "block_table_desc", "layer_list",
           "make_buffer", "paged_kpool_desc"]
