"""Hugging Face transformers hook: export Q and K of a Llama- or Qwen3-family model to attnx-capture.

    from transformers import AutoModelForCausalLM, StaticCache
    from attnx.hf import HFExporter
    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.bfloat16).cuda()
    cache = StaticCache(config=model.config, max_batch_size=1, max_cache_len=2048, device="cuda", dtype=model.dtype)
    ax = HFExporter(model, cache, batch_size=1, max_cache_len=2048, inner="sdpa")   # installs "attnx" attention
    ax.warmup()                  # one token through the model: the static cache exists, K pools are registered
    # ... start attnx-capture --backend cuda --shm /attnx.engine ...
    ax.rids = ["ax-0123456789abcdef"]           # optional: the rid of the next prefill's rows
    out = model.generate(ids, past_key_values=cache, max_new_tokens=64, do_sample=False)
    ax.end_all()                 # END for the rows of that generate() call
    ax.close()

How: an attention function registered through transformers' AttentionInterface under the name "attnx" wraps the
model's normal one (`inner`: "sdpa", "eager", ...). At layer 0 of every forward it enqueues the step's begin
kernel (libattnx-export-graph) with the forward's position_ids and input_ids, at every layer a Q-row copy of that
layer's query_states (post q_norm and RoPE, [B, H, S, D]), and the publish kernel once the last layer's keys are in
the cache; then it runs the normal attention, so outputs are bit-identical to the model without the hook. For
small steps (decode; ax_graph_fuse) the begin rides on layer 0's Q copy and the publish on the last layer's, so a
step adds one small kernel per layer and nothing else (`fuse=False`: two more, the first GPU run's layout).
Since session 4, by default (`defer`), a decode step enqueues nothing until its last layer: each layer's Q tensor is
held, and the last layer (its keys written) enqueues ONE kernel (ax_graph_step_all: set-up, every exported layer's
Q rows, publish); and (`side="capture"`) while a CUDA graph is captured that kernel goes to a side stream forked
from the engine's stream there and joined at the end of the forward (attnx.streams), so the graph's main path
carries one fork and one join instead of the kernels (measured: shm/python/README.md "Where the cost went"). Keys are
not copied: each layer's static-cache tensor [B, H_kv, max_cache_len, D] is a K pool (slot s of row b is
b·H_kv·max_cache_len + position, through a constant index table). Nothing synchronises the host, so the same
forward captured in torch.cuda.graph() and replayed exports every step.

Limits (said plainly): a static cache is required (DynamicCache reallocates its tensors each step); batch rows
must not be left-padded (positions must start at 0 for each row: use batch 1 or equal-length prompts); K pools are
registered on the first forward (call warmup() before starting attnx-capture, which reads the buffer table when
it attaches); an error in the export path disables export for the process (logged once) and never reaches the
model.

Slot recycling (shm/README.md rule 9) is detected, not avoided: the graph exporter advertises AX_SHM_FEAT_RECYCLE.
The model's forward pre-hook runs before any layer writes its cache: for a prefill (more than one token) it first
ENDs every row still active (the END kernel stores freed_step: the rows' cache is about to be overwritten), then
enqueues a step start (ax_graph_step_start); layer 0's step_begin counts another, and is a decode step's only one
(a decode step writes no key that an ended request's rows read). A capture still computing the
previous call's rows when the next prefill has started refuses them (gap "recycled") instead of reporting keys
of the new prompt. Avoidance (waiting for the capture before the next generate()) is left to the caller: let the
capture finish (its `end` records) before the next generate() when those last rows matter.

Tensor parallel (rank, world_size > 1): each rank's HFExporter makes its own segment ("/attnx.engine.<rank>" for
rank > 0 with the default name) over its own heads; query and KV heads are taken to be split evenly over the ranks
(n_q_heads = num_attention_heads / world_size, likewise KV heads; head_offset defaults to rank · n_q_heads), as
transformers' tp_plan shards q/k/v projections. Never run with real TP (see shm/python/README.md).
"""
import logging
import os

import torch

from . import _ffi
from .cuda import register
from .export import Exporter
from .graph import PREFILL, GraphExporter, StepArgs, ivec
from .streams import SideStreams

log = logging.getLogger("attnx.hf")

DEFER_MAX_BYTES = 64 << 20  # defer holds each layer's Q until the last layer: not past this much (else per layer)


def _local_heads(hq, hkv, rank, world_size, head_offset):
    """This rank's (query heads, KV heads, head_offset) when heads are split evenly over world_size ranks."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError("attnx: rank %r of world_size %r" % (rank, world_size))
    if hq % world_size or hkv % world_size:
        raise ValueError("attnx: %d query / %d KV heads do not split over %d ranks" % (hq, hkv, world_size))
    hq, hkv = hq // world_size, hkv // world_size
    off = rank * hq if head_offset is None else head_offset
    if off < 0 or off + hq > hq * world_size:
        raise ValueError("attnx: head_offset %r out of range" % off)
    return hq, hkv, off


def _text_config(model):
    c = model.config
    return c.get_text_config() if hasattr(c, "get_text_config") else c


def side_default(env=None):
    """The `side` an HFExporter gets when none is passed: $ATTNX_HF_SIDE ("0" / "1" / "capture"), else "capture"
    (the export kernel on a side stream in captured graphs, in line in eager forwards)."""
    v = (os.environ if env is None else env).get("ATTNX_HF_SIDE", "")
    return {"": "capture", "0": False, "1": True, "capture": "capture"}.get(v.strip().lower(), "capture")


def defer_default(env=None):
    """The `defer` an HFExporter gets when none is passed: $ATTNX_HF_DEFER ("0" / "1"), else True (a decode step is
    one call at its last layer)."""
    v = (os.environ if env is None else env).get("ATTNX_HF_DEFER", "")
    return v.strip() != "0"


class HFExporter:
    def __init__(self, model, cache, batch_size, max_cache_len, name=_ffi.DEFAULT_NAME, inner="sdpa",
                 q_rows=1 << 16, engine="transformers", model_name=None, impl_name="attnx", rank=0, world_size=1,
                 head_offset=None, fuse=True, layers=None, side=None, defer=None):
        c = _text_config(model)
        self.model, self.cache, self.B, self.Lmax = model, cache, batch_size, max_cache_len
        self.L = c.num_hidden_layers
        self.rank, self.world_size = rank, world_size
        self.Hq, self.Hkv, head_offset = _local_heads(c.num_attention_heads, c.num_key_value_heads, rank, world_size,
                                                      head_offset)
        if rank > 0 and name == _ffi.DEFAULT_NAME:
            name = "%s.%d" % (name, rank)
        self.D = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        dev, dt = model.device, model.dtype
        from .cuda import dtype_name

        qd = dtype_name(torch.empty(0, dtype=dt))
        self.ex = Exporter(name, engine=engine, model=(model_name or getattr(c, "_name_or_path", ""))[:95],
                           rank=rank, world_size=world_size, head_offset=head_offset,
                           n_q_heads_total=c.num_attention_heads,
                           n_layers=self.L, n_q_heads=self.Hq, n_kv_heads=self.Hkv, head_dim=self.D, q_dtype=qd,
                           k_dtype=qd, max_ctx=max_cache_len, data_size=4096, req_cap=max(16, batch_size),
                           buf_cap=self.L + 8, scale=self.D ** -0.5)
        self.q_ring = torch.zeros((q_rows, self.Hq, self.D), dtype=dt, device=dev)
        qbuf = register(self.ex, self.q_ring, _ffi.BUF_Q_RING)
        rows = torch.arange(batch_size, device=dev, dtype=torch.int64)[:, None] * (self.Hkv * max_cache_len)
        self.index = (rows + torch.arange(max_cache_len, device=dev)[None, :]).to(torch.int32).contiguous()
        ibuf = register(self.ex, self.index, _ffi.BUF_INDEX_TOKEN)
        self.g = GraphExporter(self.ex, self.q_ring, qbuf, ibuf, map_rows=batch_size, max_batch=batch_size)
        self.k_registered = set()
        self.rids, self.active, self.n_requests = [], [False] * batch_size, 0
        self.disabled, self._ids, self._step_ok = False, None, False
        self._zeros = torch.zeros((batch_size, max_cache_len), dtype=torch.int32, device=dev)
        self._inner_name = inner
        self.fuse = fuse  # one kernel for begin + layer 0's Q and for the last layer's Q + publish (small steps)
        # decode steps as one call at the last layer (every layer's Q held until then): one kernel per small step
        self.defer = defer_default() if defer is None else bool(defer)
        self._deferred, self._dq = False, []
        self.export_layers = None
        self.set_export_layers(layers)
        self._impl_name = impl_name
        dev_ = dev
        self._cuda = getattr(dev, "type", None) == "cuda"  # a side stream only for a model on a CUDA device
        self._streams = SideStreams(self.L + 1, lambda: torch.cuda.Stream(device=dev_), torch.cuda.Event,
                                    lambda: torch.cuda.current_stream(dev_))
        self.side = False
        self.set_side(side_default() if side is None else side)
        self._post = None
        self._install(impl_name)

    # ---- installation ----------------------------------------------------------------------------------------

    def _install(self, impl_name):
        from transformers import AttentionInterface
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        if self._inner_name == "eager":
            from transformers.models.llama.modeling_llama import eager_attention_forward as inner
        else:
            inner = ALL_ATTENTION_FUNCTIONS[self._inner_name]
        self._inner = inner
        AttentionInterface.register(impl_name, self._attention)
        try:  # transformers ≥ 4.53 builds masks per attention implementation
            from transformers import AttentionMaskInterface
            from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

            AttentionMaskInterface.register(impl_name, ALL_MASK_ATTENTION_FUNCTIONS[self._inner_name])
        except (ImportError, KeyError):
            pass
        if hasattr(self.model, "set_attn_implementation"):
            self.model.set_attn_implementation(impl_name)
        else:
            self.model.config._attn_implementation = impl_name
        self._hook = self.model.register_forward_pre_hook(self._pre_forward, with_kwargs=True)
        try:  # the join runs even when the forward raises
            self._post = self.model.register_forward_hook(self._post_forward, always_call=True)
        except TypeError:
            self._post = self.model.register_forward_hook(self._post_forward)

    def close(self):
        """END for active rows, stop exporting, close the segment. The model keeps its attention wrapper, which
        then only runs the inner attention."""
        if self.g:
            self.end_all("abort")
            torch.cuda.synchronize()
            self.g.close()
            self.g = None
        self.disabled = True
        self.ex.close()

    # ---- per forward -----------------------------------------------------------------------------------------

    def set_export_layers(self, layers=None):
        """Export only these layers' Q rows (None: every layer): the other layers' Q copies are not enqueued at all,
        so each costs nothing per step; a consumer asking for them gets none. Takes effect for forwards (and graph
        captures) after the call."""
        self.export_layers = set(layers) if layers else None
        self.g.set_layers(sorted(self.export_layers) if self.export_layers else None)

    def set_side(self, side):
        """Where the export kernels run: False = the engine's stream (in line); True = a side stream forked from
        it at each layer and joined at the end of the forward (attnx.streams); "capture" = the side stream only
        while a CUDA graph is being captured (eager forwards stay in line: no event calls on their host path).
        Takes effect from the next forward (call outside capture). A model that is not on a CUDA device always runs
        in line (no stream is made for it)."""
        if side not in (False, True, "capture"):
            raise ValueError("attnx: side must be False, True or 'capture', not %r" % (side,))
        self.side = side
        if side and self._cuda:
            self._streams.prepare()

    def _side_now(self):
        if self.disabled or self.g is None or not self.side or not self._cuda:
            return False
        if self.side is True:
            return True
        return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()

    def _post_forward(self, module, args, output):
        try:
            self._streams.end()
        except Exception as e:  # never into the model
            self._fail("join", e)
        return None

    def _exports(self, layer):
        return self.export_layers is None or layer in self.export_layers

    def set_enabled(self, on):
        """Install (True) or remove (False) the hook: removed, the model runs its `inner` attention and no pre hook,
        exactly as without attnx (for A/B benchmarks); the segment and the graph exporter stay open."""
        if on and self._hook is None:
            self._install(self._impl_name)
        elif not on and self._hook is not None:
            self._hook.remove()
            self._hook = None
            if self._post is not None:
                self._post.remove()
                self._post = None
            self._streams.join()
            if hasattr(self.model, "set_attn_implementation"):
                self.model.set_attn_implementation(self._inner_name)
            else:
                self.model.config._attn_implementation = self._inner_name

    def _pre_forward(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        self._ids = ids if isinstance(ids, torch.Tensor) and ids.dim() == 2 else None
        try:
            self._streams.begin(self._side_now())
        except Exception as e:  # never into the model
            self._fail("side stream", e)
        if self.disabled or self.g is None:
            return None
        x = ids if isinstance(ids, torch.Tensor) else kwargs.get("inputs_embeds")
        try:
            if isinstance(x, torch.Tensor) and x.dim() >= 2 and x.shape[1] > 1:
                # Rule 9: a prefill restarts its rows at position 0, so layer 0's cache update (before its
                # attention, where step_begin runs) overwrites keys of the requests it ends: END them (freed_step),
                # then count a step start before that update. A decode step writes only position
                # cache_position of rows whose requests go on, never a key an ended request's rows read (those
                # lie below its length), so layer 0's step_begin is its step start: one kernel less per step.
                self.end_all("stop")
                self.g.step_start()
        except Exception as e:  # never into the model
            self._fail("pre hook", e)
        return None

    def _fail(self, what, e):
        if not self.disabled:
            log.error("attnx: export disabled after an error in %s: %s", what, e)
        self.disabled = True

    def _register_k(self, layer, key):
        B, H, Lm, D = key.shape
        if (B, H, Lm, D) != (self.B, self.Hkv, self.Lmax, self.D) or not key.is_contiguous():
            raise ValueError("layer %d keys %s are not the static cache [%d, %d, %d, %d]" %
                             (layer, tuple(key.shape), self.B, self.Hkv, self.Lmax, self.D))
        slots = (B - 1) * H * Lm + Lm
        register(self.ex, key, _ffi.BUF_K_POOL, layer=layer, shape=(slots, H, D), strides=(D, Lm * D, 1))
        self.k_registered.add(layer)

    def _begin_rows(self, S):
        ids = self._ids if self._ids is not None else self._zeros[:, :S]
        for b in range(self.B):
            if self.active[b]:
                self.g.request_end(b, "stop")
            rid = self.rids.pop(0) if self.rids else "hf-%d-%d" % (id(self) & 0xffff, self.n_requests)
            self.n_requests += 1
            self.g.request_begin(rid, ids[b].contiguous() if not ids[b].is_contiguous() else ids[b],
                                 prompt_len=S, row=b)
            self.active[b] = True

    def _step_begin(self, query, kw, fused):
        """The step's begin (fused with layer 0's Q copy); returns the stream it went to (None = current). A decode
        step in defer mode enqueues nothing here: its arguments are kept for _step_all at the last layer."""
        B, _, S, _ = query.shape
        pos = kw.get("position_ids")
        self._step_ok = B == self.B and pos is not None and pos.dim() == 2 and pos.shape[1] == S
        self._deferred, self._dq = False, []
        if not self._step_ok:
            return None
        if S > 1:
            self._begin_rows(S)  # BEGINs on the engine's stream, before the fork
        ids = self._ids if self._ids is not None and tuple(self._ids.shape) == (B, S) else self._zeros[:, :S]
        a = StepArgs()
        a.n_rows, a.flags, a.n_tok_const = B, PREFILL if S > 1 else 0, S
        a.seq_end = ivec(pos, stride=pos.stride(0) if pos.shape[0] == B else 0, add=1,
                         offset=(S - 1) * pos.stride(1))
        a.tokens, a.token_bytes = ids.data_ptr(), ids.element_size()
        a.tok_stride_b, a.tok_stride_t = ids.stride(0), ids.stride(1)
        self._args = a  # the struct is copied into the kernel launch; kept for _step_all and debugging
        held = query.numel() * query.element_size() * self.L  # what holding every layer's Q would keep alive
        if fused and self.defer and S == 1 and self.L > 1 and held <= DEFER_MAX_BYTES:
            self._deferred = True
            self._hold(0, query)
            return None
        s = self._streams.fork(0, query)
        if fused:
            self.g.step_begin_q(a, 0, query, query.stride(0), query.stride(2), query.stride(1), stream=s)
        else:
            self.g.step_begin(a, stream=s)
        return s

    def _hold(self, layer, query):
        """Defer mode: keep this layer's Q (alive until the step's one kernel is enqueued) if it is exported."""
        if not self._exports(layer):
            return
        st = (query.stride(0), query.stride(2), query.stride(1))
        if self._dq and (self._dq[0][2] != st or self._dq[0][1].dtype != query.dtype):
            raise ValueError("layer %d's Q strides %s differ from layer %d's %s" % (layer, st, self._dq[0][0],
                                                                                  self._dq[0][2]))
        self._dq.append((layer, query, st))

    def _step_all(self, layer, query):
        """Defer mode, last layer (its keys written): the whole step in one call."""
        self._hold(layer, query)
        dq, self._dq, self._deferred = self._dq, [], False
        qs = [q for _, q, _ in dq]
        st = dq[0][2] if dq else (query.stride(0), query.stride(2), query.stride(1))
        self.g.step_all(self._args, [l for l, _, _ in dq], qs, *st, stream=self._streams.fork(layer, qs))

    def _attention(self, module, query, key, value, attention_mask, **kw):
        """Kernels per step, fused (default): layer 0 begin + its Q rows, one Q copy per middle layer, the last
        layer's Q rows + publish: `layers` kernels. Publishing before the last layer's attention is right here
        because `key` is the static cache with this step's keys already written (the cache update precedes the
        attention function; _register_k checks that `key` is the cache tensor). Unfused: 2 + layers."""
        layer = getattr(module, "layer_idx", None)
        published = False
        if not self.disabled and layer is not None:
            try:
                if layer not in self.k_registered:
                    self._register_k(layer, key)
                st = (query.stride(0), query.stride(2), query.stride(1))
                if layer == 0:
                    s = self._step_begin(query, kw, self.fuse)
                    if self._step_ok and not self.fuse and self._exports(0):
                        self.g.export_q(0, query, *st, stream=s)
                elif self._step_ok and self._deferred and layer == self.L - 1:
                    self._step_all(layer, query)
                    published = True
                elif self._step_ok and self._deferred:
                    self._hold(layer, query)
                elif self._step_ok and self.fuse and layer == self.L - 1:
                    # the device skips the copy of a layer not exported
                    self.g.export_q_publish(layer, query, *st, stream=self._streams.fork(layer, query))
                    published = True
                elif self._step_ok and self._exports(layer):
                    self.g.export_q(layer, query, *st, stream=self._streams.fork(layer, query))
            except Exception as e:  # never into the model
                self._fail("layer %s" % layer, e)
        out = self._inner(module, query, key, value, attention_mask, **kw)
        if not self.disabled and layer == self.L - 1 and self._step_ok and not published:
            try:
                self.g.publish(stream=self._streams.fork(self.L))
            except Exception as e:
                self._fail("publish", e)
        return out

    # ---- helpers -------------------------------------------------------------------------------------------

    def warmup(self):
        """Run one token through the model with the static cache (so every layer's cache tensor exists and is
        registered), then reset the cache. Call before starting attnx-capture."""
        ids = torch.zeros((self.B, 1), dtype=torch.long, device=self.model.device)
        with torch.no_grad():
            self.model(input_ids=ids, past_key_values=self.cache, use_cache=True,
                       cache_position=torch.zeros(1, dtype=torch.long, device=ids.device))
        torch.cuda.synchronize()
        self.end_all("abort")
        if hasattr(self.cache, "reset"):
            self.cache.reset()
        missing = set(range(self.L)) - self.k_registered
        if missing:
            raise RuntimeError("attnx: no K pool for layers %s" % sorted(missing))

    def end_all(self, reason="stop"):
        """END for every row that began a request (call after generate())."""
        if self.g is None:
            return
        for b in range(self.B):
            if self.active[b]:
                self.g.request_end(b, reason)
                self.active[b] = False
