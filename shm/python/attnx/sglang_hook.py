"""SGLang hook: export Q and K of every TP rank to attnx-capture, CUDA graphs on.

Load it with SGLang's --forward-hooks (server_args.forward_hooks, a JSON list; SGLang registers each spec's hook on
the modules matching `target_modules`, see sglang/srt/model_executor/hook_manager.py):

    python -m sglang.launch_server --model-path Qwen/Qwen3-8B --tp 2 --forward-hooks '[
      {"name": "attnx-q", "target_modules": ["model.layers.*.self_attn.attn"],
       "hook_factory": "attnx.sglang_hook:pre_hook_factory", "hook_type": "forward_pre", "with_kwargs": true,
       "config": {"shm": "/attnx.sglang"}},
      {"name": "attnx-publish", "target_modules": ["model.layers.*.self_attn.attn"],
       "hook_factory": "attnx.sglang_hook:post_hook_factory", "hook_type": "forward"}]'

(`python -m attnx.sglang_hook` prints that JSON.) Both hooks sit on RadixAttention modules, whose forward is
(q, k, v, forward_batch, ...): q is [tokens, H_q_local·D] after RoPE.

What it reads, all SGLang's own structures, never copied:
  * forward_batch.token_to_kv_pool: MHATokenToKVPool, one K tensor per layer `k_buffer[l]` [slots + page, H_kv, D]
    (fp8 stored as uint8: exported with the pool's fp8 dtype and the layer's k_scale), slot 0 = padding slot;
  * forward_batch.req_to_token_pool.req_to_token [rows, max_ctx] int32: the index table; request-map row =
    req_pool_idx;
  * forward_batch.req_pool_indices, seq_lens (K of the current token is already written when the publish kernel
    runs: it follows the last layer's attention), out_cache_loc (0 marks the padded rows of a CUDA-graph batch),
    input_ids, extend_seq_lens / extend_prefix_lens(_cpu) / extend_start_loc, rids, forward_mode.
Requests: a rid first seen in an extend batch begins (BEGIN on the device, on its req_pool_idx, prompt ids from
the extend chunk; a radix-cache prefix has no ids on the device and is written as 0); ReqToTokenPool.free is
wrapped so a freed req_pool_idx publishes END; a row reused without a free publishes END (abort) before the new
BEGIN (on the GPU). TP: rank r exports segment `shm` (+ ".r" for r > 0) with head_offset = r·H_q_local, so each
rank's attnx-capture reports global head ids.

Slot recycling (shm/README.md rule 9) is detected, not avoided: the graph exporter advertises AX_SHM_FEAT_RECYCLE,
the END kernel (from the wrapped free, on the forward stream) stores freed_step, and layer 0's step_begin (this pre
hook, before its attention writes K) counts a step start, so rows computed from KV slots the next forwards rewrite
are refused (gap "recycled"). The wrapped free also enqueues a step start right after its ENDs (session 3): SGLang
rewrites a reused req_to_token row in the scheduler before the next forward, and a row checked between that
rewrite and layer 0 of the next forward passed before. The price: rows the capture computes after the free (not
only after the next forward's start) are refused; on a busy engine the two moments are a step apart. Avoidance
(deferring SGLang's frees without blocking) would mean wrapping its allocators, and the device END has no host
descriptor count for ax_export_consumer_done. Writes by another stream or the host are not ordered by any of this.

Decode forwards replayed from SGLang's CUDA graphs run the kernels the hooks enqueued at capture time: the hooks
themselves (Python) run only for eager forwards and at graph capture. Never run inside SGLang in this repository
(SGLang cannot be installed here): tests/test_gpu_sglang_shape.py drives these hooks with objects shaped and
recycled as SGLang's, under torch.cuda.graph capture and replay. See shm/python/README.md.
"""
import collections
import json
import logging
import os

from . import _ffi

log = logging.getLogger("attnx.sglang")

FP8 = {"float8_e4m3fn": "fp8_e4m3", "float8_e5m2": "fp8_e5m2"}


def _tp_rank_world():
    try:
        from sglang.srt.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

        return get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()
    except Exception:  # not inside SGLang (tests), or TP not initialised
        return int(os.environ.get("ATTNX_TP_RANK", "0")), int(os.environ.get("ATTNX_TP_SIZE", "1"))


def _fb_from(args, kwargs):
    if len(args) > 3:
        return args[3]
    return kwargs.get("forward_batch")


class _State:
    """One per process (= per TP rank): the segment, the graph exporter, the rid bookkeeping."""

    def __init__(self, config):
        self.config = config
        self.ready = False
        self.disabled = False
        self.known = collections.OrderedDict()  # rids that began (bounded LRU)
        self.k_done = set()
        self.stream = None

    # ---- set-up on the first hooked forward --------------------------------------------------------------

    def setup(self, module, q, fb):
        import torch

        from .cuda import register
        from .export import Exporter
        from .graph import GraphExporter

        pool = getattr(fb, "token_to_kv_pool", None)
        rpool = getattr(fb, "req_to_token_pool", None)
        if pool is None or rpool is None or not hasattr(pool, "k_buffer"):
            raise RuntimeError("forward_batch has no token_to_kv_pool.k_buffer / req_to_token_pool "
                               "(an SGLang version or KV layout this hook does not know)")
        self.start_layer = getattr(pool, "start_layer", 0) or 0
        self.n_layers = pool.layer_num
        self.Hq, self.Hkv = module.tp_q_head_num, module.tp_k_head_num
        self.D = getattr(module, "qk_head_dim", None) or module.head_dim
        rank, world = _tp_rank_world()
        name = self.config.get("shm", "/attnx.sglang") + ("" if rank == 0 else ".%d" % rank)
        r2t = rpool.req_to_token
        qdt = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}[q.dtype]
        kdt = FP8.get(str(pool.dtype).replace("torch.", ""), qdt)
        window = getattr(module, "sliding_window_size", -1)
        self.ex = Exporter(name, engine="sglang", model=str(self.config.get("model", ""))[:95],
                           rank=rank, world_size=world, n_layers=self.n_layers, n_q_heads=self.Hq,
                           n_kv_heads=self.Hkv, head_offset=rank * self.Hq, n_q_heads_total=world * self.Hq,
                           head_dim=self.D, q_dtype=qdt, k_dtype=kdt, scale=float(module.scaling),
                           logit_cap=float(getattr(module, "logit_cap", 0.0) or 0.0),
                           window=window if window and window > 0 else 0, max_ctx=r2t.shape[1],
                           req_cap=max(r2t.shape[0], 16), buf_cap=self.n_layers + 8, data_size=4096)
        rows = int(self.config.get("q_rows", 1 << 16))
        self.q_ring = torch.zeros((rows, self.Hq, self.D), dtype=q.dtype, device=q.device)
        qbuf = register(self.ex, self.q_ring, _ffi.BUF_Q_RING)
        ibuf = register(self.ex, r2t, _ffi.BUF_INDEX_TOKEN)
        self.k_pool, self.kdt = pool, kdt
        self.g = GraphExporter(self.ex, self.q_ring, qbuf, ibuf, map_rows=r2t.shape[0],
                               max_batch=int(self.config.get("max_batch", 1024)))
        layers = self.config.get("layers")  # export only these (local) layers: no Q-copy kernel for the others
        self.export_layers = set(int(l) for l in layers) if layers else None
        if self.export_layers:
            self.g.set_layers(sorted(self.export_layers))
        self._wrap_free(rpool)
        self.ready = True
        log.info("attnx: exporting %s: %d layers, %d/%d heads, D %d, rank %d/%d", name, self.n_layers, self.Hq,
                 self.Hkv, self.D, rank, world)

    def register_k(self, module):
        """K pool of this layer, at its first forward (SGLang runs every layer in its warm-up and graph capture,
        before any request; an attnx-capture already attached takes each one up when it appears)."""
        from .cuda import register

        l = module.layer_id - self.start_layer
        kb = self.k_pool.k_buffer[l]  # raw storage: uint8 for fp8
        scale = getattr(module, "k_scale_float", None)
        if scale is None:
            scale = getattr(module, "k_scale", None)
        scale = 1.0 if scale is None else float(scale.item() if hasattr(scale, "item") else scale)
        register(self.ex, kb, _ffi.BUF_K_POOL, layer=l, dtype=self.kdt,
                 scale=scale if self.kdt.startswith("fp8") else 1.0)
        self.k_done.add(l)

    def _wrap_free(self, rpool):
        orig = rpool.free
        state = self

        def free(free_index):
            try:
                if not state.disabled and state.stream is not None:
                    idx = getattr(free_index, "req_pool_idx", free_index)  # newer SGLang passes the Req
                    rows = [idx] if isinstance(idx, int) else list(idx)
                    for i in rows:
                        state.g.request_end(int(i), "stop", stream=state.stream)
                    if rows:  # rule 9: the scheduler may rewrite these req_to_token rows before the next forward
                        state.g.step_start(stream=state.stream)
                    rid = getattr(free_index, "rid", None)
                    if rid is not None:  # a Req: if it comes back (retracted, re-prefilled), it begins again
                        state.known.pop(rid, None)
            except Exception as e:
                state.fail("free", e)
            return orig(free_index)

        rpool.free = free

    def fail(self, what, e):
        if not self.disabled:
            log.error("attnx: export disabled after an error in %s: %s", what, e)
        self.disabled = True

    # ---- per forward -----------------------------------------------------------------------------------------

    def begin_new(self, fb):
        """BEGIN for rids seen for the first time in this extend batch (host lists only: no device sync)."""
        rids = getattr(fb, "rids", None)
        pre, ext = getattr(fb, "extend_prefix_lens_cpu", None), getattr(fb, "extend_seq_lens_cpu", None)
        if not rids or pre is None or ext is None:
            return
        start = 0
        for b, rid in enumerate(rids):
            n = int(ext[b])
            if rid not in self.known:
                self.known[rid] = True
                if len(self.known) > 4 * self.g.max_batch + 4096:
                    self.known.popitem(last=False)
                toks = fb.input_ids[start:start + n]
                self.g.request_begin(str(rid)[:_ffi.SHM_RID_MAX - 1], toks, prompt_len=int(pre[b]) + n,
                                     skip=int(pre[b]), row_tensor=fb.req_pool_indices[b:b + 1])
            start += n

    def q_strides(self, q3):
        """(st_b, st_t, st_h) of q3 [tokens, H, D] for this step: element (b, i, h, d) at
        b·st_b + (in_off(b) + i)·st_t + h·st_h + d (attnx_export_graph.h). Decode rows have no in_off, so the batch
        stride carries them (found by the --cpu run of test_gpu_sglang_shape: every decode row but the first
        exported row 0's Q)."""
        return (q3.stride(0) if self.q_row_b else 0), q3.stride(0), q3.stride(1)

    def step_begin(self, fb, q3):
        """The step's begin kernel fused with layer 0's Q copy (q3: [tokens, H, D] view); False: not exported."""
        from .graph import PREFILL, StepArgs, ivec

        mode = fb.forward_mode
        if mode.is_idle() or fb.batch_size < 1 or fb.batch_size > self.g.max_batch:
            return False
        a = StepArgs()
        a.n_rows = fb.batch_size
        a.row = ivec(fb.req_pool_indices)
        a.seq_end = ivec(fb.seq_lens)
        ids = fb.input_ids
        a.tokens, a.token_bytes = ids.data_ptr(), ids.element_size()
        if mode.is_decode():
            a.n_tok_const, a.tok_stride_b, a.tok_stride_t = 1, 1, 1
            self.q_row_b = True  # row b's one token is q[b]: Q's batch stride is its token stride
            a.pad, a.pad_value = ivec(fb.out_cache_loc), 0  # padded CUDA-graph rows write slot 0
        elif mode.is_extend() and not mode.is_target_verify():
            self.begin_new(fb)
            a.flags = PREFILL
            a.n_tok, a.in_off = ivec(fb.extend_seq_lens), ivec(fb.extend_start_loc)
            a.tok_stride_b, a.tok_stride_t = 0, 1
            self.q_row_b = False  # row b's tokens are q[extend_start_loc[b] + i]
        else:
            return False  # speculative verify / draft modes: not exported
        self.g.step_begin_q(a, 0, q3, *self.q_strides(q3))
        return True


_state = None


def _get_state(config):
    global _state
    if _state is None:
        _state = _State(config)
    return _state


def pre_hook_factory(config):
    """forward_pre hook (with_kwargs) for RadixAttention: set-up, BEGINs, the step's begin kernel at the first
    layer, and each layer's Q-row copy."""
    st = _get_state(config or {})

    def hook(module, args, kwargs):
        if st.disabled:
            return None
        try:
            import torch

            q, fb = args[0] if args else kwargs.get("q"), _fb_from(args, kwargs)
            if fb is None or q is None:
                return None
            if not st.ready:
                st.setup(module, q, fb)
            l = module.layer_id - st.start_layer
            if l not in st.k_done:
                st.register_k(module)
            q3 = q.view(q.shape[0], st.Hq, st.D) if q.dim() == 2 else q  # no -1: an idle batch has 0 tokens
            if l == 0:
                if not torch.cuda.is_current_stream_capturing():
                    st.stream = torch.cuda.current_stream()  # where ENDs go: the stream replays run on
                st.active = st.step_begin(fb, q3)  # with layer 0's Q rows: one kernel for a small step
            elif getattr(st, "active", False) and (st.export_layers is None or l in st.export_layers):
                st.g.export_q(l, q3, *st.q_strides(q3))
        except Exception as e:
            st.fail("pre hook of layer %s" % getattr(module, "layer_id", "?"), e)
        return None

    return hook


def post_hook_factory(config):
    """forward hook for RadixAttention: after the last layer's attention (its K written), publish the step."""
    st = _get_state(config or {})

    def hook(module, inputs, output):
        if st.disabled or not st.ready or not getattr(st, "active", False):
            return None
        try:
            if module.layer_id - st.start_layer == st.n_layers - 1:
                st.g.publish()
                st.active = False
        except Exception as e:
            st.fail("publish", e)
        return None

    return hook


def forward_hooks_json(shm="/attnx.sglang", target="model.layers.*.self_attn.attn"):
    """The --forward-hooks value that loads this module."""
    return json.dumps([
        {"name": "attnx-q", "target_modules": [target], "hook_factory": "attnx.sglang_hook:pre_hook_factory",
         "hook_type": "forward_pre", "with_kwargs": True, "config": {"shm": shm}},
        {"name": "attnx-publish", "target_modules": [target],
         "hook_factory": "attnx.sglang_hook:post_hook_factory", "hook_type": "forward"}])


if __name__ == "__main__":
    print(forward_hooks_json())
