#!/usr/bin/env python3
"""Tensor parallel 2 on two GPUs: two processes, one segment each, merged `heads` = the single-GPU run = eager.
Exit 77 (SKIP) without torch, two CUDA devices, the attnx CUDA libraries, or attnx-capture (--backend cuda),
attnx-relay and attnx-tail in AX_BUILD_DIR. Passed on 2 × H100 (2026-11-27, tree e8187c5) and on 2 × H200
(2026-11-27, tree b467c51: session 4's kernels), both before the "tp-defer" case existed; scripts/gpu-test runs it
in its own stage when two GPUs are present. `--cpu` runs the model half here (below).

The model: a randomly initialised Qwen3-shaped decoder (32 query heads, 8 KV heads, head_dim 128, hidden 1024,
2 layers, q/k RMSNorm, RoPE θ 1e6, SwiGLU; f32, so 1e-3 means something), written in plain torch in this file so
the test needs no transformers; when transformers is importable, the single-GPU worker also loads the same weights
into transformers' Qwen3ForCausalLM and checks this model's attention probabilities against its eager
`output_attentions` (then "eager" below is transformers'). Weights come from one seeded CPU generator, so every
process builds the same model.

Real tensor parallelism, small: rank r of 2 holds query heads 16r..16r+15, KV heads 4r..4r+3 (q/k/v projections
split by rows, o_proj by columns, then an NCCL all-reduce), and half of the MLP (gate/up by rows, down by
columns, all-reduce); embeddings, norms and lm_head are replicated. Each rank's attention therefore sees only its
local heads, as in SGLang or vLLM, and exports them through the graph-safe export (attnx.graph's kernels, the ones
attnx.hf and attnx.sglang_hook drive) into its own segment `/attnx.<e>` / `/attnx.<e>.1` with rank, world_size 2,
head_offset 16r and n_q_heads_total 32. The per-step calls mirror attnx.hf's hook: BEGIN with the prompt, the step
kernel at layer 0 (position and token tensors), a Q copy per layer ([B, H, S, D] after q_norm and RoPE), publish
after the last layer (every layer's K is in its static cache [B, H_kv, max_len, D] by then), END.

Two export layouts, one per request (the relay's `model` label picks it): "tp-stream" and "tp-body" use the plain
per-layer calls above (step_begin, export_q per layer, publish); "tp-defer" exports as HFExporter's defaults do
(fuse and defer on; attnx.hf's rule: a step is deferred when it has one token, the model more than one layer and
every layer's Q together is at most attnx.hf.DEFER_MAX_BYTES). A decode step then enqueues nothing per layer: each
layer's Q is held and the last layer (its keys written) makes ONE GraphExporter.step_all call with every layer's Q;
a prefill keeps hf's fused per-layer path (step_start before the prompt's keys, as hf's pre-hook; BEGIN; then
step_begin_q at layer 0, export_q per middle layer, export_q_publish at the last). The kernels go to the engine's
stream: HFExporter's default side="capture" forks a side stream only while a CUDA graph is captured, and this test
captures none. Each rank counts its calls per request; tp-defer checks one step_all per decode step and no plain
step_begin (so it cannot pass on the per-layer path by accident).

Each deployment (the single-GPU one first, then TP 2) runs the real binaries: one attnx-capture --backend cuda per
rank (--device r, --rank r), one attnx-relay, attnx-tail. This process is the engine's OpenAI server (http.server):
for each request the relay forwards, it has every rank run the same prefill + decode steps (greedy on the single
GPU; the TP run is teacher-forced with the single run's tokens so both see the same sequence) and answers streamed
or not. Checked:
  - the client's responses (chat streamed and not, heads mode, every prompt row): every (position, layer, head)
    exactly once with global head ids, every entry complete, in both deployments;
  - attnx-tail's feed: each record once, each head from the rank that holds it;
  - TP 2 vs single GPU: the same keys, logsumexp within 1e-3 and the sorted top-k probabilities within 1e-3;
    each record's probabilities exp(logit - logsumexp) against eager attention within 1e-3;
  - the TP model itself: its logits within 1e-3 of the single GPU's at every step (else the sharding is wrong);
  - the export calls each rank made (GPU only): tp-defer one step_all per decode step, the others none.

`--cpu`: on a machine without a GPU (gloo instead of NCCL, two processes): TP 2 logits and per-rank attention
probabilities against the single-process model, transformers' eager attention when present; with the three
binaries also the whole deployment and every check above, the ranks exporting through host memory (HostExport:
attnx.Exporter, the same segment fields) to attnx-capture --backend cpu. Only RankExport (the CUDA export) and
the CUDA backend are then left out (tp-defer then runs HostExport's one path like the other two requests).

Usage: test_gpu_tp2.py                                   (ATTNX_LIB_DIR = the build's shm/ folder; AX_BUILD_DIR)
       test_gpu_tp2.py --cpu [CAPTURE RELAY TAIL]        (with the binaries: the whole deployment on the CPU)
"""
import json
import math
import os
import shutil
import signal
import socket
import socketserver
import http.server
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import proc_util  # noqa: E402
sys.path.insert(0, os.path.join(HERE, ".."))

SKIP = 77
ROOT = os.path.normpath(os.path.join(HERE, "..", "..", ".."))
CFG = dict(vocab=4096, hidden=1024, inter=2048, layers=2, hq=32, hkv=8, d=128, theta=1e6, eps=1e-6)
P_LEN, N_GEN = 12, 16          # prompt tokens; generated tokens shown (finish "length": rows 0..P+N-2)
MAX_LEN = 64                   # static cache length
TOPK = 8
TOL = 1e-3
WAIT_MS = 8000
DEFER_LABELS = ("tp-defer",)  # requests whose ranks export as HFExporter's defaults (fuse + defer)
# NVLink multicast stays off (the GPU machines' rule), also in the processes started here.
for _k, _v in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"), ("NVSHMEM_DISABLE_NVLS", "1")):
    os.environ.setdefault(_k, _v)


# ---- the model (plain torch) -----------------------------------------------------------------------------------

def make_weights(torch, seed=0):
    """Full (unsharded) weights on the CPU from one seeded generator: the same in every process."""
    g = torch.Generator().manual_seed(seed)
    c = CFG
    h, hq, hkv, d, i = c["hidden"], c["hq"], c["hkv"], c["d"], c["inter"]

    def rn(*shape, std=0.02):
        return torch.randn(*shape, generator=g, dtype=torch.float32) * std

    def norm(n):
        return 1.0 + rn(n, std=0.1)

    w = {"embed": rn(c["vocab"], h), "norm": norm(h), "lm_head": rn(c["vocab"], h), "layers": []}
    for _ in range(c["layers"]):
        w["layers"].append({"in_norm": norm(h), "q": rn(hq * d, h), "k": rn(hkv * d, h), "v": rn(hkv * d, h),
                            "o": rn(h, hq * d), "q_norm": norm(d), "k_norm": norm(d), "post_norm": norm(h),
                            "gate": rn(i, h), "up": rn(i, h), "down": rn(h, i)})
    return w


def shard(w, rank, world):
    """Rank `rank`'s part: heads [rank·H/world, ...) of q/k/v (rows) and o (columns), MLP columns likewise."""
    c = CFG
    d = c["d"]
    hq, hkv, i = c["hq"] // world, c["hkv"] // world, c["inter"] // world
    out = {k: w[k] for k in ("embed", "norm", "lm_head")}
    out["layers"] = []
    for lw in w["layers"]:
        q0, k0, i0 = rank * hq * d, rank * hkv * d, rank * i
        out["layers"].append(dict(lw, q=lw["q"][q0:q0 + hq * d], k=lw["k"][k0:k0 + hkv * d],
                                  v=lw["v"][k0:k0 + hkv * d], o=lw["o"][:, q0:q0 + hq * d],
                                  gate=lw["gate"][i0:i0 + i], up=lw["up"][i0:i0 + i], down=lw["down"][:, i0:i0 + i]))
    return out


class Model:
    """Qwen3 decoder as transformers computes it (RMSNorm in f32, rotate-half RoPE, GQA, causal softmax), on the
    heads of one rank. `hook(layer, q)` sees each layer's query [B, H_local, S, D] after q_norm and RoPE, once that
    layer's K is in the cache; `after(layer)` runs after each layer's attention."""

    def __init__(self, torch, w, rank, world, device, max_len=MAX_LEN):
        self.t, self.dev, self.world = torch, device, world
        c = CFG
        self.hq, self.hkv, self.d = c["hq"] // world, c["hkv"] // world, c["d"]
        self.w = {k: v.to(device) for k, v in w.items() if k != "layers"}
        self.layers = [{k: v.to(device).contiguous() for k, v in lw.items()} for lw in w["layers"]]
        self.cache_k = [torch.zeros(1, self.hkv, max_len, self.d, device=device) for _ in self.layers]
        self.cache_v = [torch.zeros(1, self.hkv, max_len, self.d, device=device) for _ in self.layers]
        self.inv_freq = 1.0 / (c["theta"] ** (torch.arange(0, self.d, 2, dtype=torch.float32, device=device) / self.d))
        self.hook = self.after = None

    def _rms(self, x, w):
        v = x.pow(2).mean(-1, keepdim=True)
        return w * (x * self.t.rsqrt(v + CFG["eps"]))

    def _rope(self, x, cos, sin):  # x [B, H, S, D]
        x1, x2 = x[..., :self.d // 2], x[..., self.d // 2:]
        return x * cos + self.t.cat((-x2, x1), dim=-1) * sin

    def _reduce(self, x):
        if self.world > 1:
            self.t.distributed.all_reduce(x)
        return x

    def forward(self, ids, pos0, use_cache=True, probs=None):
        """ids [1, S] (int64, on the device) at positions pos0..; returns logits [1, S, V]. probs: a list that
        receives each layer's attention probabilities [H_local, S, keys] (the eager output_attentions)."""
        t = self.t
        B, S = ids.shape
        pos = t.arange(pos0, pos0 + S, device=self.dev, dtype=t.float32)
        f = pos[:, None] * self.inv_freq[None, :]
        emb = t.cat((f, f), dim=-1)
        cos, sin = emb.cos()[None, None], emb.sin()[None, None]
        x = self.w["embed"][ids]
        n_keys = pos0 + S
        mask = t.full((S, n_keys), float("-inf"), device=self.dev).triu(pos0 + 1)
        g = self.hq // self.hkv
        for li, lw in enumerate(self.layers):
            hs = self._rms(x, lw["in_norm"])
            q = self._rms((hs @ lw["q"].T).view(B, S, self.hq, self.d), lw["q_norm"]).transpose(1, 2)
            k = self._rms((hs @ lw["k"].T).view(B, S, self.hkv, self.d), lw["k_norm"]).transpose(1, 2)
            v = (hs @ lw["v"].T).view(B, S, self.hkv, self.d).transpose(1, 2)
            q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
            if use_cache:
                self.cache_k[li][:, :, pos0:pos0 + S] = k
                self.cache_v[li][:, :, pos0:pos0 + S] = v
                K, V = self.cache_k[li][:, :, :n_keys], self.cache_v[li][:, :, :n_keys]
            else:
                K, V = k, v
            if self.hook:
                self.hook(li, q)
            K, V = K.repeat_interleave(g, dim=1), V.repeat_interleave(g, dim=1)
            a = t.softmax((q @ K.transpose(-1, -2)) * self.d ** -0.5 + mask, dim=-1)
            if probs is not None:
                probs.append(a[0])
            o = (a @ V).transpose(1, 2).reshape(B, S, self.hq * self.d)
            if self.after:
                self.after(li)
            x = x + self._reduce(o @ lw["o"].T)
            hs = self._rms(x, lw["post_norm"])
            m = (t.nn.functional.silu(hs @ lw["gate"].T) * (hs @ lw["up"].T)) @ lw["down"].T
            x = x + self._reduce(m)
        return self._rms(x, self.w["norm"]) @ self.w["lm_head"].T


def transformers_attention(torch, w, seq, device):
    """transformers' Qwen3 eager output_attentions of seq with these weights, or None without transformers."""
    try:
        from transformers import Qwen3Config, Qwen3ForCausalLM
    except ImportError:
        return None
    c = CFG
    cfg = Qwen3Config(vocab_size=c["vocab"], hidden_size=c["hidden"], intermediate_size=c["inter"],
                      num_hidden_layers=c["layers"], num_attention_heads=c["hq"], num_key_value_heads=c["hkv"],
                      head_dim=c["d"], rope_theta=c["theta"], rms_norm_eps=c["eps"], tie_word_embeddings=False,
                      max_position_embeddings=4096, attn_implementation="eager")
    m = Qwen3ForCausalLM(cfg)
    sd = {"model.embed_tokens.weight": w["embed"], "model.norm.weight": w["norm"], "lm_head.weight": w["lm_head"]}
    names = {"in_norm": "input_layernorm", "post_norm": "post_attention_layernorm", "q": "self_attn.q_proj",
             "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj", "q_norm": "self_attn.q_norm",
             "k_norm": "self_attn.k_norm", "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
    for l, lw in enumerate(w["layers"]):
        for k, n in names.items():
            sd["model.layers.%d.%s.weight" % (l, n)] = lw[k]
    missing, unexpected = m.load_state_dict(sd, strict=False)
    missing = [k for k in missing if "rotary" not in k]
    if missing or unexpected:
        raise RuntimeError("transformers Qwen3: missing %r unexpected %r" % (missing, unexpected))
    m = m.to(device).eval()
    with torch.no_grad():
        o = m(torch.tensor([seq], device=device), output_attentions=True, use_cache=False)
    return [a[0].double().cpu() for a in o.attentions]  # [H, T, T] per layer


# ---- one rank's export (the calls attnx.hf makes, with this rank's head range) --------------------------------

def wishes(w):
    """Whether an exporter's view of the capture (GraphExporter.enabled() / Exporter.wanted(): (mask, prefill) or
    None) shows a wish for some layer. A capture that attached but has not yet said what it wants shows (0, False),
    a truthy tuple: waiting for that alone would start exporting steps that carry no Q rows."""
    return bool(w) and bool(w[0])


class RankExport:
    def __init__(self, torch, model, shm, rank, world):
        import attnx
        from attnx import _ffi
        from attnx.cuda import register
        from attnx.graph import GraphExporter

        self.t, self.model = torch, model
        c = CFG
        self.ex = attnx.Exporter(shm, engine="tp-test", model="qwen3-shaped-random", rank=rank, world_size=world,
                                 n_layers=c["layers"], n_q_heads=model.hq, n_kv_heads=model.hkv,
                                 head_offset=rank * model.hq, n_q_heads_total=c["hq"], head_dim=c["d"],
                                 q_dtype="f32", k_dtype="f32", max_ctx=MAX_LEN, data_size=4096, req_cap=16,
                                 buf_cap=c["layers"] + 8, scale=c["d"] ** -0.5)
        dev = model.dev
        self.q_ring = torch.zeros((4096, model.hq, c["d"]), dtype=torch.float32, device=dev)
        qbuf = register(self.ex, self.q_ring, _ffi.BUF_Q_RING)
        self.index = torch.arange(MAX_LEN, device=dev, dtype=torch.int32)[None, :].contiguous()  # [1, MAX_LEN]
        ibuf = register(self.ex, self.index, _ffi.BUF_INDEX_TOKEN)
        for l, ck in enumerate(model.cache_k):  # [1, H_kv, MAX_LEN, D]: slot s, head h at s·D + h·MAX_LEN·D
            register(self.ex, ck, _ffi.BUF_K_POOL, layer=l, shape=(MAX_LEN, model.hkv, c["d"]),
                     strides=(c["d"], MAX_LEN * c["d"], 1))
        self._init_calls(GraphExporter(self.ex, self.q_ring, qbuf, ibuf, map_rows=1, max_batch=1))

    def _init_calls(self, g):
        """What decides the calls: the graph exporter g (or RecordingGraph), the layers, attnx.hf's defer limit."""
        from attnx.hf import DEFER_MAX_BYTES

        self.g, self.L, self.defer_max = g, CFG["layers"], DEFER_MAX_BYTES
        self.set_mode(False)
        self.model.hook, self.model.after = self._q, self._after

    @classmethod
    def dry(cls, torch, model, g):
        """A RankExport without segment or CUDA, its calls going to g (the --cpu check of the call sequence)."""
        self = cls.__new__(cls)
        self.t, self.model = torch, model
        self._init_calls(g)
        return self

    def set_mode(self, defer):
        """Before a request: the plain per-layer calls (False) or attnx.hf's defaults, fuse + defer (True)."""
        self.defer, self._deferred, self._dq = bool(defer), False, []
        self.calls = dict.fromkeys(("step_start", "step_begin", "export_q", "publish", "step_begin_q",
                                    "export_q_publish", "step_all"), 0)

    def _call(self, fn, *args):
        self.calls[fn] += 1
        return getattr(self.g, fn)(*args)

    def wait_consumer(self, timeout=60):
        end = time.time() + timeout
        while time.time() < end:
            if wishes(self.g.enabled()):
                return
            time.sleep(0.02)
        raise RuntimeError("no capture became visible to the exporter")

    def begin(self, rid, ids):
        if self.defer:  # attnx.hf's pre-hook for a prefill (its ENDs done): a step start before the prompt's keys
            self._call("step_start")
        self.g.request_begin(rid, ids[0].contiguous(), prompt_len=ids.shape[1], row=0)

    def end(self):
        self.g.request_end(0, "length")

    def step(self, ids, pos, decode_step):
        """Before a forward of ids [1, S] at positions pos [1, S] (int64 tensors that live through the forward).
        The kernels derive the decode step themselves."""
        from attnx.graph import PREFILL, StepArgs, ivec

        S = ids.shape[1]
        a = StepArgs()
        a.n_rows, a.flags, a.n_tok_const = 1, PREFILL if S > 1 else 0, S
        a.seq_end = ivec(pos, stride=pos.stride(0), add=1, offset=(S - 1) * pos.stride(1))
        a.tokens, a.token_bytes = ids.data_ptr(), ids.element_size()
        a.tok_stride_b, a.tok_stride_t = ids.stride(0), ids.stride(1)
        self._args, self._S = a, S  # the struct is copied at each call; ids and pos outlive the forward
        if not self.defer:
            self._call("step_begin", a)

    def _q(self, layer, q):
        """Layer `layer`'s K is in the cache, q [1, H, S, D] is its query (attnx.hf's attention function here)."""
        st = (q.stride(0), q.stride(2), q.stride(1))
        if not self.defer:
            self._call("export_q", layer, q, *st)
            return
        if layer == 0:  # attnx.hf's _step_begin: defer a one-token step whose held Q stays small
            held = q.numel() * q.element_size() * self.L
            self._deferred, self._dq = self._S == 1 and self.L > 1 and held <= self.defer_max, []
            if not self._deferred:
                self._call("step_begin_q", self._args, 0, q, *st)
                return
        if self._deferred:  # held until the last layer (attnx.hf's _hold / _step_all, every layer exported)
            if self._dq and (self._dq[0][2] != st or self._dq[0][1].dtype != q.dtype):
                raise ValueError("layer %d's Q strides %s differ from layer %d's %s" % (layer, st, self._dq[0][0],
                                                                                      self._dq[0][2]))
            self._dq.append((layer, q, st))
            if layer == self.L - 1:
                dq, self._dq, self._deferred = self._dq, [], False
                self._call("step_all", self._args, [l for l, _, _ in dq], [x for _, x, _ in dq], *dq[0][2])
        elif layer == self.L - 1:
            self._call("export_q_publish", layer, q, *st)
        else:
            self._call("export_q", layer, q, *st)

    def _after(self, layer):
        if layer == self.L - 1 and not self.defer:
            self._call("publish")

    def close(self):
        self.t.cuda.synchronize()
        self.g.close()
        self.ex.close()


class RecordingGraph:
    """Stands in for attnx.graph.GraphExporter in `--cpu`'s check of RankExport's call sequence (the real one needs
    CUDA): records each call and its arguments, enqueues nothing; a consumer wants every layer and prefill rows."""

    def __init__(self):
        self.log = []

    def enabled(self):
        return (1 << CFG["layers"]) - 1, True

    def __getattr__(self, fn):
        if fn.startswith("_"):
            raise AttributeError(fn)
        return lambda *a, **kw: self.log.append((fn, a))


def check_rank_calls(torch):
    """RankExport's calls on the CPU model (one rank, all heads), per-layer and defer, against RecordingGraph: the
    names in order, attnx.hf's arguments (StepArgs, layer list, strides), and that step_all hands over each layer's
    own Q (equal to what the per-layer run's export_q got at the same step). The kernels themselves: GPU only."""
    from attnx.graph import PREFILL

    model = Model(torch, make_weights(torch), 0, 1, "cpu")
    g = RecordingGraph()
    rx = RankExport.dry(torch, model, g)
    logs = {}
    for label in ("tp-stream", "tp-defer"):
        del g.log[:]
        rx.set_mode(label in DEFER_LABELS)
        run_request(torch, model, rx, "dry", None)
        check(rx.calls == expected_calls(label), "dry %s: calls %s, expected %s" % (label, rx.calls,
                                                                                   expected_calls(label)))
        logs[label] = list(g.log)
    L, names = CFG["layers"], [n for n, _ in logs["tp-defer"]]
    want = ["step_start", "request_begin", "step_begin_q"] + ["export_q"] * (L - 2) + ["export_q_publish"] + \
        ["step_all"] * (N_GEN - 1) + ["request_end"]
    check(names == want, "dry tp-defer: calls %s, expected %s" % (names, want))
    per_layer = [a for n, a in logs["tp-stream"] if n == "export_q"]  # (layer, q, st_b, st_t, st_h)
    for n, a in logs["tp-defer"]:
        if n == "step_begin_q":
            args, layer, q = a[:3]
            check(layer == 0 and args.flags == PREFILL and args.n_tok_const == P_LEN and args.n_rows == 1 and
                  tuple(q.shape) == (1, CFG["hq"], P_LEN, CFG["d"]) and a[3:] == (q.stride(0), q.stride(2),
                                                                                  q.stride(1)),
                  "dry tp-defer: step_begin_q arguments")
    alls = [a for n, a in logs["tp-defer"] if n == "step_all"]
    worst = 0.0
    for i, (args, layers, qs, st_b, st_t, st_h) in enumerate(alls):
        check(args.flags == 0 and args.n_tok_const == 1 and args.n_rows == 1 and args.seq_end.add == 1 and
              args.seq_end.p and args.tokens and layers == list(range(L)) and len(qs) == L,
              "dry tp-defer: step_all %d arguments" % i)
        for l, q in zip(layers, qs):
            check((st_b, st_t, st_h) == (q.stride(0), q.stride(2), q.stride(1)), "dry tp-defer: strides")
            ref = per_layer[(1 + i) * L + l]  # the per-layer run's step 1+i, layer l
            check(ref[0] == l and ref[1].shape == q.shape, "dry: per-layer step %d layer %d" % (1 + i, l))
            worst = max(worst, (ref[1] - q).abs().max().item())
    check(len(alls) == N_GEN - 1 and worst == 0.0, "dry tp-defer: %d step_all, Q vs per-layer export_q %.3g" % (
        len(alls), worst))
    plain = {}
    for n, _ in logs["tp-stream"]:
        plain[n] = plain.get(n, 0) + 1
    print("RankExport call sequence (RecordingGraph, no kernels): tp-defer %d step_all over layers %s, Q equal to "
          "the per-layer run's (worst %.2g); tp-stream %s" % (len(alls), alls[0][1] if alls else None, worst,
                                                             " ".join("%s %d" % kv for kv in sorted(plain.items()))))


class HostExport:
    """The same export on host memory (attnx.Exporter, copies instead of kernels), for `--cpu`: it lets the whole
    deployment (captures with --backend cpu, relay, tail, comparisons) run on a machine without a GPU."""

    def __init__(self, torch, model, shm, rank, world):
        import attnx
        from attnx import _ffi

        self.t, self.model, self.attnx = torch, model, attnx
        c = CFG
        hq, hkv, d = model.hq, model.hkv, c["d"]
        self.ex = attnx.Exporter(shm, engine="tp-test", model="qwen3-shaped-random", rank=rank, world_size=world,
                                 n_layers=c["layers"], n_q_heads=hq, n_kv_heads=hkv, head_offset=rank * hq,
                                 n_q_heads_total=c["hq"], head_dim=d, q_dtype="f32", k_dtype="f32", max_ctx=MAX_LEN,
                                 data_size=8 << 20, scale=d ** -0.5)
        self.kb = [self.ex.add_host_buffer(attnx.make_buffer(_ffi.BUF_K_POOL, "f32", (MAX_LEN, hkv, d), layer=l))
                   for l in range(c["layers"])]
        self.kt = [torch.frombuffer(b.view, dtype=torch.float32).view(MAX_LEN, hkv, d) for b in self.kb]
        self.qb = self.ex.add_host_buffer(attnx.make_buffer(_ffi.BUF_Q_RING, "f32", (256, hq, d)))
        self.qt = torch.frombuffer(self.qb.view, dtype=torch.float32).view(256, hq, d)
        self.ix = self.ex.add_host_buffer(attnx.make_buffer(_ffi.BUF_INDEX_TOKEN, "i32", (1, MAX_LEN)))
        torch.frombuffer(self.ix.view, dtype=torch.int32)[:] = torch.arange(MAX_LEN, dtype=torch.int32)
        self.L, self.row_bytes = c["layers"], hq * d * 4
        self.calls = None
        model.hook, model.after = self._q, self._after

    def set_mode(self, defer):
        """Host memory has one export path (copies at each layer, the step at the last); no calls are counted."""

    def wait_consumer(self, timeout=60):
        end = time.time() + timeout
        while time.time() < end:
            if wishes(self.ex.wanted()):
                return
            time.sleep(0.02)
        raise RuntimeError("no capture became visible to the exporter")

    def begin(self, rid, ids):
        self.req = self.ex.request_begin(rid, ids[0].tolist())

    def end(self):
        self.ex.request_end(self.req, "length")

    def step(self, ids, pos, decode_step):
        w = self.ex.wanted()
        self.mask = w[0] if w else 0
        self.layers = self.attnx.layer_list(self.mask)
        self.toks, self.pos0, self.dstep = ids[0].tolist(), int(pos[0, 0]), decode_step
        self.q_row, self.q_at = 0, 0
        if self.layers:
            self.q_row, ptr = self.ex.q_reserve(self.qb.index, len(self.toks) * len(self.layers))
            self.q_at = (ptr - self.qb.ptr) // self.row_bytes

    def _q(self, layer, q):  # this layer's K is in the model's cache: copy it, and Q when wanted
        p0, S = self.pos0, len(self.toks)
        self.kt[layer][p0:p0 + S] = self.model.cache_k[layer][0, :, p0:p0 + S].transpose(0, 1)
        if layer in self.layers:
            li = self.layers.index(layer)
            for t in range(S):
                self.qt[self.q_at + t * len(self.layers) + li] = q[0, :, t]

    def _after(self, layer):
        if layer == self.L - 1:
            self.ex.step(self.req, self.pos0, self.toks, self.ix.index, 0, self.dstep, self.q_row,
                         (self.mask & (2 ** 64 - 1), self.mask >> 64), len(self.toks) > 1)

    def close(self):
        self.ex.close()


# ---- the worker process (one per rank) -------------------------------------------------------------------------

def run_request(torch, model, exp, rid, tokens):
    """Prefill + N_GEN-1 decode steps. tokens: the sequence to feed (teacher-forced) or None (greedy from a prompt
    of P_LEN fixed ids). Returns (sequence, logits of each forward's last row [N_GEN, V] on the CPU)."""
    dev = model.dev
    seq = list(tokens) if tokens else [(7 * i + 3) % CFG["vocab"] for i in range(P_LEN)]
    out = []
    with torch.no_grad():
        ids = torch.tensor([seq[:P_LEN]], device=dev)
        pos = torch.arange(P_LEN, device=dev)[None]
        if exp:
            exp.wait_consumer()
            exp.begin(rid, ids)
            exp.step(ids, pos, 0)
        lg = model.forward(ids, 0)[:, -1]
        out.append(lg)
        for i in range(N_GEN - 1):  # decode at P+i: query token g_i, samples g_{i+1}
            if not tokens:
                seq.append(int(lg.argmax(-1).item()))
            ids = torch.tensor([[seq[P_LEN + i]]], device=dev)
            pos = torch.tensor([[P_LEN + i]], device=dev)
            if exp:
                exp.step(ids, pos, i + 1)
            lg = model.forward(ids, P_LEN + i)[:, -1]
            out.append(lg)
        if not tokens:
            seq.append(int(lg.argmax(-1).item()))
        if exp:
            exp.end()
    if dev != "cpu":
        torch.cuda.synchronize()
    return seq, torch.cat(out).cpu()


def worker(rank, world, shm, port, conn, cpu):
    try:
        import torch

        torch.set_grad_enabled(False)
        dev = "cpu" if cpu else "cuda:%d" % rank
        if not cpu:
            torch.cuda.set_device(rank)
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
        if world > 1:
            torch.distributed.init_process_group("gloo" if cpu else "nccl", init_method="tcp://127.0.0.1:%d" % port,
                                                 rank=rank, world_size=world)
        w = make_weights(torch)
        model = Model(torch, shard(w, rank, world) if world > 1 else w, rank, world, dev)
        name = shm if rank == 0 else "%s.%d" % (shm, rank)  # the names attnx-capture --rank R attaches
        exp = None if shm is None else (HostExport if cpu else RankExport)(torch, model, name, rank, world)
        conn.send(("ready", rank))
        while True:
            msg = conn.recv()
            if msg[0] == "run":  # ("run", rid, tokens or None[, defer])
                if exp:
                    exp.set_mode(len(msg) > 3 and msg[3])
                seq, lg = run_request(torch, model, exp, msg[1], msg[2])
                conn.send(("done", seq, lg, dict(exp.calls) if exp and exp.calls is not None else None))
            elif msg[0] == "probs":  # this rank's eager attention of a whole sequence (no cache)
                pr = []
                model.forward(torch.tensor([msg[1]], device=dev), 0, use_cache=False, probs=pr)
                conn.send(("probs", [p.double().cpu() for p in pr]))
            elif msg[0] == "hf":  # transformers' eager attention of the full model (None without transformers)
                conn.send(("hf", transformers_attention(torch, w, msg[1], dev)))
            else:
                break
        if exp:
            exp.close()
        if world > 1:
            torch.distributed.destroy_process_group()
        conn.send(("bye", rank))
    except BaseException as e:  # reported to the parent, which fails the test
        import traceback

        conn.send(("error", rank, "%s\n%s" % (e, traceback.format_exc())))


class Ranks:
    """`world` worker processes (spawned), driven over pipes; every command goes to all of them."""

    def __init__(self, world, shm, cpu=False):
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        port = free_port()
        self.conns, self.procs = [], []
        for r in range(world):
            a, b = ctx.Pipe()
            p = ctx.Process(target=worker, args=(r, world, shm, port, b, cpu), daemon=True)
            p.start()
            self.conns.append(a)
            self.procs.append(p)
        self.all(None, timeout=600)

    def all(self, msg, timeout=300):
        if msg is not None:
            for c in self.conns:
                c.send(msg)
        out = []
        for c in self.conns:
            if not c.poll(timeout):
                raise RuntimeError("a rank did not answer %r within %d s" % (msg and msg[0], timeout))
            m = c.recv()
            if m[0] == "error":
                raise RuntimeError("rank %d: %s" % (m[1], m[2]))
            out.append(m)
        return out

    def close(self):
        try:
            self.all(("quit",), timeout=60)
        except (RuntimeError, OSError, EOFError):
            pass
        for p in self.procs:
            p.join(10)
            if p.is_alive():
                p.kill()


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


# ---- the engine's OpenAI server (this process) -----------------------------------------------------------------

class Upstream(http.server.BaseHTTPRequestHandler):
    ranks = None
    teacher = None   # label -> token sequence to feed (TP run), absent = greedy (single run)
    results = None   # label -> (sequence, logits)

    def log_message(self, *a):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))) or b"{}")
        rid, label, stream = body.get("rid", ""), body.get("model", ""), bool(body.get("stream"))
        res = self.ranks.all(("run", rid, self.teacher.get(label), label in DEFER_LABELS))
        self.results[label] = (res[0][1], res[0][2], [m[3] for m in res])  # sequence, logits, each rank's calls
        texts = ["t%d " % tok for tok in res[0][1][P_LEN:P_LEN + N_GEN]]
        if stream:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Connection", "close")
            self.end_headers()
            for i, t in enumerate(texts + [None]):
                c = {"delta": {"content": t}, "finish_reason": None} if t else {"delta": {}, "finish_reason": "length"}
                ev = {"id": "c-" + rid, "object": "chat.completion.chunk", "created": 1, "model": label,
                      "choices": [dict(index=0, **c)]}
                self.wfile.write(b"data: " + json.dumps(ev).encode() + b"\n\n")
            self.wfile.write(b"data: [DONE]\n\n")
            return
        out = json.dumps({"id": "c-" + rid, "object": "chat.completion", "created": 1, "model": label,
                          "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(texts)},
                                       "logprobs": None, "finish_reason": "length"}],
                          "usage": {"prompt_tokens": P_LEN, "completion_tokens": N_GEN,
                                    "total_tokens": P_LEN + N_GEN}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(out)


class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True


# ---- a deployment: ranks, captures, relay, tail ----------------------------------------------------------------

def read_jsonl(path):
    with open(path) as f:
        return [json.loads(l) for l in f if l.strip()]


def wait_for(pred, timeout, what):
    end = time.time() + timeout
    while time.time() < end:
        v = pred()
        if v:
            return v
        time.sleep(0.05)
    raise RuntimeError("timed out waiting for " + what)


def stop(p):
    proc_util.stop(p, timeout=10)


def deployment(bins, world, teacher, requests, cpu=False):
    """Run `requests` [(label, stream)] through a relay in front of `world` ranks. Returns {label: (rid, events,
    feed records, sequence, logits, each rank's export calls (None on host memory))}."""
    capture, relay, tail = bins
    shm = "/attnx.tp2g%d.%d" % (os.getpid(), world)
    d = tempfile.mkdtemp(prefix="attnx-tp2g")
    rec, pol, feed = ("ipc://%s/%s.sock" % (d, n) for n in ("rec", "pol", "feed"))
    ranks = Ranks(world, shm, cpu)
    procs, server, results = [], None, {}
    try:
        handler = type("H", (Upstream,), {"ranks": ranks, "teacher": teacher, "results": results})
        server = Server(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        log = os.path.join(d, "relay.log")
        procs.append(subprocess.Popen([relay, "--listen", "127.0.0.1:0", "--records", rec, "--policy", pol, "--feed",
                                       feed, "--upstream", "http://127.0.0.1:%d" % server.server_address[1],
                                       "--attention-wait-ms", str(WAIT_MS), "--policy-wait-ms", "5000",
                                       "--log-level", "info"], stderr=open(log, "w")))
        wait_for(lambda: all(os.path.exists(a[6:]) for a in (rec, pol, feed)), 10, "the relay's sockets")
        port = int(wait_for(lambda: _port(log), 10, "the relay's port"))
        time.sleep(0.2)
        tail_out = os.path.join(d, "tail.jsonl")
        procs.append(subprocess.Popen([tail, "--feed", feed, "--timeout", "120000"], stdout=open(tail_out, "w")))
        time.sleep(0.3)
        for r in range(world):
            cmd = [capture] + (["--backend", "cpu"] if cpu else ["--backend", "cuda", "--device", str(r)]) + [
                   "--shm", shm, "--records", rec, "--policy", pol,
                   "--mode", "heads", "--layers", "all", "--prefill", "--top-k", str(TOPK), "--threads", "2",
                   "--stats-interval", "0", "--log-level", "warn"]
            procs.append(subprocess.Popen(cmd + (["--rank", str(r)] if r else [])))
        wait_for(lambda: _captures(port) == world, 60, "%d captures on the relay" % world)
        out = {}
        for label, stream in requests:
            body = {"model": label, "stream": stream, "max_tokens": N_GEN, "return_attention_tokens": True,
                    "attention_mode": "heads", "include_prompt_attention": True, "top_k_attention": TOPK,
                    "messages": [{"role": "user", "content": "hi"}]}
            req = urllib.request.Request("http://127.0.0.1:%d/v1/chat/completions" % port,
                                         data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=300) as r:
                rid = r.headers.get("X-Attnx-Rid")
                if stream:
                    evs = [json.loads(l[6:]) for l in (x.decode().strip() for x in r)
                           if l.startswith("data: ") and l != "data: [DONE]"]
                else:
                    evs = [json.loads(r.read())]
            wait_for(lambda: sum(1 for x in read_jsonl(tail_out) if x.get("t") == "end" and x.get("rid") == rid)
                     >= world, 30, "the captures' end records")
            recs = read_jsonl(tail_out)
            src_rank = {x["src"]: x["rank"] for x in recs if x.get("t") == "hello"}
            feed_recs = [dict(x, rank=src_rank.get(x["src"])) for x in recs
                         if x.get("t") == "attn" and x.get("rid") == rid]
            out[label] = (rid, evs, feed_recs) + results[label]
        return out
    finally:
        for p in reversed(procs):
            stop(p)
        if server:
            server.shutdown()
            server.server_close()
        ranks.close()
        shutil.rmtree(d, ignore_errors=True)


def _port(log):
    import re

    with open(log) as f:
        m = re.search(r"listening on \S+ \(port (\d+)\)", f.read())
    return m.group(1) if m else None


def _captures(port):
    with urllib.request.urlopen("http://127.0.0.1:%d/v1/attention/capabilities" % port, timeout=5) as r:
        return sum(1 for c in json.loads(r.read()).get("captures", []) if "n_q_heads" in c)


# ---- checks ----------------------------------------------------------------------------------------------------

failures = []


def check(cond, msg):
    if not cond:
        failures.append(msg)
        print("FAIL: " + msg)
    return cond


def response_heads(evs, stream, what):
    """{(pos, layer, head): (positions, logits, lse)} from a response; each key once, every entry complete."""
    got = {}
    for ev in evs:
        c0 = (ev.get("choices") or [{}])[0]
        t = c0.get("delta", {}) if stream else c0
        for key in ("prompt_attention", "attention_tokens"):
            for e in t.get(key) or []:
                for lk, lv in (e.get("layers") or {}).items():
                    hs = [h["head_id"] for h in lv["heads"]]
                    check(hs == list(range(CFG["hq"])), "%s: position %d layer %s: heads %s (an incomplete entry)"
                          % (what, e["position"], lk, hs[:6]))
                    for h in lv["heads"]:
                        k = (e["position"], int(lk), h["head_id"])
                        check(k not in got, "%s: duplicate %r" % (what, k))
                        got[k] = (h["token_positions"], h["topk_logits"], h["logsumexp_all"])
    want = {(p, l, h) for p in range(P_LEN + N_GEN - 1) for l in range(CFG["layers"]) for h in range(CFG["hq"])}
    check(set(got) == want, "%s: %d (position, layer, head), expected %d; missing e.g. %r" % (
        what, len(got), len(want), sorted(want - set(got))[:4]))
    return got


def feed_heads(recs, world, what):
    got = {}
    hl = CFG["hq"] // world
    for x in recs:
        k = (x["position"], x["layer_id"], x["head_id"])
        check(k not in got, "%s feed: duplicate %r" % (what, k))
        check(x["rank"] is not None and x["head_id"] // hl == x["rank"], "%s feed: head %d from rank %r" % (
            what, x["head_id"], x["rank"]))
        got[k] = (x["token_positions"], x["topk_logits"], x["logsumexp_all"])
    return got


def probs_of(rec):
    pos, logits, lse = rec
    return [(j, math.exp(lg - lse)) for j, lg in zip(pos, logits)]


def compare(tp, one, ref, what):
    """TP vs single (lse and sorted top-k probabilities) and each vs the eager reference probabilities."""
    check(set(tp) == set(one), "%s: TP and single-GPU keys differ" % what)
    worst_one = worst_ref = 0.0
    for k, rec in tp.items():
        p, l, h = k
        if k in one:
            a = sorted((v for _, v in probs_of(rec)), reverse=True)
            b = sorted((v for _, v in probs_of(one[k])), reverse=True)
            worst_one = max([worst_one, abs(rec[2] - one[k][2])] + [abs(x - y) for x, y in zip(a, b)])
        for src in (rec, one.get(k)):
            for j, v in probs_of(src) if src else []:
                worst_ref = max(worst_ref, abs(v - ref[l][h, p, j].item()))
    check(worst_one < TOL, "%s: TP 2 vs single GPU worst %.3g" % (what, worst_one))
    check(worst_ref < TOL, "%s: vs eager worst %.3g" % (what, worst_ref))
    print("%s: %d records, TP 2 vs single GPU worst %.2e, vs eager worst %.2e" % (what, len(tp), worst_one, worst_ref))


def expected_calls(label):
    """The export calls one rank makes for a request (prefill + N_GEN-1 decode steps, CFG's layers)."""
    n, L = N_GEN, CFG["layers"]
    if label in DEFER_LABELS:  # prefill: step_start, step_begin_q, export_q per middle layer, export_q_publish
        return dict(step_start=1, step_begin=0, export_q=L - 2, publish=0, step_begin_q=1, export_q_publish=1,
                    step_all=n - 1)
    return dict(step_start=0, step_begin=n, export_q=n * L, publish=n, step_begin_q=0, export_q_publish=0,
                step_all=0)


def check_calls(label, one, tp):
    """Each rank's export calls (counted in RankExport): tp-defer must have taken the defer path."""
    if any(c is None for c in one + tp):
        print("%s: export calls not counted (host memory export)" % label)
        return
    want = expected_calls(label)
    for what, calls in (("single GPU", one), ("TP 2", tp)):
        for r, c in enumerate(calls):
            check(c == want, "%s %s rank %d: export calls %s, expected %s" % (label, what, r, c, want))
    nz = {k: v for k, v in tp[0].items() if v}
    print("%s: export calls per rank (single GPU and both TP ranks alike: %s): %s" % (
        label, all(c == tp[0] for c in one + tp), " ".join("%s %d" % kv for kv in sorted(nz.items()))))


# ---- main ------------------------------------------------------------------------------------------------------

def require():
    from gpu_common import require_gpu

    torch = require_gpu(2)
    build = os.environ.get("AX_BUILD_DIR", os.path.join(ROOT, "build-gpu"))
    bins = [os.path.join(build, p) for p in ("capture/attnx-capture", "relay/attnx-relay", "tail/attnx-tail")]
    if not all(os.path.exists(b) for b in bins):
        print("SKIP: attnx-capture, attnx-relay, attnx-tail not all built in %s" % build)
        sys.exit(SKIP)
    try:  # a build without the CUDA backend refuses --backend cuda at once (status 2)
        rc = subprocess.run([bins[0], "--backend", "cuda", "--shm", "/attnx.none%d" % os.getpid(), "--policy", "",
                             "--records", "ipc:///tmp/attnx-none.sock"], capture_output=True, timeout=2).returncode
    except subprocess.TimeoutExpired:
        rc = None
    if rc is not None:
        print("SKIP: attnx-capture --backend cuda exits %d (no CUDA backend in this build)" % rc)
        sys.exit(SKIP)
    return torch, bins


def gpu_main():
    torch, bins = require()
    return run_all(bins)


def run_all(bins, cpu=False):
    reqs = [("tp-stream", True), ("tp-body", False), ("tp-defer", True)]
    one = deployment(bins, 1, {}, reqs, cpu)
    teacher = {label: one[label][3] for label, _ in reqs}
    tp = deployment(bins, 2, teacher, reqs, cpu)
    # eager references of each sequence on the single-GPU model (and transformers', when present)
    ranks = Ranks(1, None, cpu)  # no export: the model only
    try:
        for label, stream in reqs:
            seq = teacher[label][:P_LEN + N_GEN - 1]  # the positions exported: 0..P+N-2
            ref = ranks.all(("probs", seq))[0][1]
            hf = ranks.all(("hf", seq))[0][1]
            if hf is not None:
                worst = max((a - b).abs().max().item() for a, b in zip(ref, hf))
                check(worst < 1e-4, "%s: this model vs transformers' eager attention %.3g" % (label, worst))
                print("%s: model vs transformers Qwen3 eager output_attentions worst %.2e" % (label, worst))
                ref = hf
            else:
                print("%s: transformers not installed: eager reference is this file's model" % label)
            check(tp[label][3] == teacher[label], "%s: the TP run fed another sequence" % label)
            dl = (tp[label][4] - one[label][4]).abs().max().item()
            check(dl < TOL, "%s: TP 2 logits vs single GPU worst %.3g (sharding?)" % (label, dl))
            flips = sum(1 for i in range(N_GEN) if tp[label][4][i].argmax().item() != teacher[label][P_LEN + i])
            print("%s: TP 2 logits vs single GPU worst %.2e, greedy argmax differs at %d of %d steps" % (
                label, dl, flips, N_GEN))
            r_one = response_heads(one[label][1], stream, label + " single GPU response")
            r_tp = response_heads(tp[label][1], stream, label + " TP 2 response")
            f_one = feed_heads(one[label][2], 1, label + " single GPU")
            f_tp = feed_heads(tp[label][2], 2, label + " TP 2")
            check(set(f_tp) == set(r_tp), "%s: TP 2 feed and response keys differ" % label)
            check(set(f_one) == set(r_one), "%s: single GPU feed and response keys differ" % label)
            compare(r_tp, r_one, ref, label + " (responses)")
            compare(f_tp, f_one, ref, label + " (feed)")
            check_calls(label, one[label][5], tp[label][5])
    finally:
        ranks.close()
    print("FAILED: %d" % len(failures) if failures else "PASS")
    return 1 if failures else 0


def cpu_main():
    """The model half on the CPU: TP 2 (gloo) vs one process, and transformers' attention when present."""
    try:
        import torch
    except ImportError:
        print("SKIP: no torch")
        return SKIP
    seq = [(7 * i + 3) % CFG["vocab"] for i in range(P_LEN)]
    one = Ranks(1, None, cpu=True)
    try:
        s1, l1 = one.all(("run", "x", None))[0][1:3]
        ref = one.all(("probs", s1[:-1]))[0][1]
        hf = one.all(("hf", s1[:-1]))[0][1]
    finally:
        one.close()
    check(s1[:P_LEN] == seq, "the prompt")
    two = Ranks(2, None, cpu=True)
    try:
        res = two.all(("run", "x", s1))
        parts = two.all(("probs", s1[:-1]))
    finally:
        two.close()
    for r, (_, s, lg, _) in enumerate(res):
        check(s == s1, "rank %d fed another sequence" % r)
        d = (lg - l1).abs().max().item()
        check(d < 1e-4, "rank %d: TP 2 logits vs one process %.3g" % (r, d))
        print("rank %d: TP 2 logits vs one process worst %.2e" % (r, d))
    hl = CFG["hq"] // 2
    for r, (_, pr) in enumerate(parts):
        d = max((p - ref[l][r * hl:(r + 1) * hl]).abs().max().item() for l, p in enumerate(pr))
        check(d < 1e-5, "rank %d: its heads' attention vs one process %.3g" % (r, d))
        print("rank %d: heads %d..%d attention vs one process worst %.2e" % (r, r * hl, (r + 1) * hl - 1, d))
    check_rank_calls(torch)
    # the cached decode path computes the same probabilities as the full-sequence pass
    if hf is not None:
        d = max((a - b).abs().max().item() for a, b in zip(ref, hf))
        check(d < 1e-4, "model vs transformers' eager attention %.3g" % d)
        print("model vs transformers Qwen3 eager output_attentions worst %.2e" % d)
    else:
        print("transformers not installed: no comparison with its Qwen3")
    bins = [a for a in sys.argv[1:] if a != "--cpu"]
    if len(bins) == 3:  # the whole deployment with host exports and CPU captures
        return run_all(bins, cpu=True)
    print("FAILED: %d" % len(failures) if failures else "PASS")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(cpu_main() if "--cpu" in sys.argv[1:] else gpu_main())
