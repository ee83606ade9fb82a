#!/usr/bin/env python3
"""Where the HF hook's per-step cost goes (issue 6: hook on ≥ 0.99 × off with CUDA graphs on; batch 1 measured
0.983, ~41 µs per 2.41 ms step). One process, one model (bench_gpu_hf.py's Qwen3-shaped one: 32 q / 8 kv heads,
D 128, hidden 4096, bf16, random weights, AX_BENCH_LAYERS layers, default 8), a drain consumer attached that wants
the capture's `--layers auto` set, CUDA graphs on. Three parts:

1. Model: decode tokens/s of graph replays, hook off vs each variant, AX_HC_REPS rounds (default 3) with the mode
   order rotated per round, AX_HC_STEPS steps (default 256), batch sizes AX_HC_BATCH (default "1,32"). Variants
   (AX_HC_MODES: a comma list, or "all"; default DEFAULT_MODES below, the micro part's flag sets likewise):
     on          the hook as shipped (fused kernels, in line on the engine's stream)
     wrap        the "attnx" attention installed but no export kernel (the wrapper and the mask path alone)
     empty       every export kernel replaced by an empty kernel (graph-node cost of `layers` nodes)
     fence-gpu   device-scope fences instead of system scope (breaks the ordering rules: measurement only)
     ctl-dev     the heartbeat block read from device memory (no host loads in the begin kernel)
     seg-dev     ctl-dev + the segment's stores/loads in device memory (no PCIe traffic at all; nothing published)
     no-qcopy    the Q copies skipped
     opt         AX_GRAPH_OPT_FEWER: one host round trip for the heartbeat block, the publish's host loads during
                 its Q copy, 3 system fences per publish instead of 5 (keeps every guarantee)
     steps-only  only the begin and publish kernels (export layers = {L-1}): 2 kernels per step
     unfused     fuse=False: begin, one copy per layer, publish (layers + 2 kernels)
     side        the export kernels on a side stream forked per layer and joined at the forward's end
                 (attnx.streams; keeps every guarantee)
     side-small  side, the fused kernels with 128-thread blocks (OPT_SMALL: a 1024-thread block of 54 registers
                 fills an SM's register file, so a kernel beside it may wait for it); side-small-opt: + opt
     side-empty  side with empty kernels: the fork/join's own cost
     defer       HFExporter(defer=True): a decode step is ONE call at the last layer (ax_graph_step_all: set-up,
                 every layer's Q rows, publish; one kernel at batch 1, three at batch 32), every layer's Q tensor
                 held until then; defer-opt: + opt; side-defer: that one kernel on the side stream (one fork);
                 side-defer-opt: + opt (the hook's defaults since session 4); side-defer-small-opt: + small
2. Micro: graphs of 32 steps of the export kernels alone (no model) per kernel variant, µs per step: the whole
   decode step (begin_q, L-2 copies, q_publish), begin_q alone, one Q copy alone, begin_q + q_publish, the whole
   step as step_all (defer); flags as above.
3. Profile (torch.profiler, if it sees kernels inside graph replays), batch 1, modes off / on / defer-opt /
   side-defer-opt: the span of one replayed step and the attnx kernels' summed duration (in
   bench-export.txt), and every kernel of that step in order with its start, duration, the gap before it and its
   stream ($OUT/profile-export.txt).

Writes $OUT/bench-export.txt, $OUT/profile-export.txt and $OUT/trace-<mode>-b1.json when OUT is set. Exit 77
without a GPU.
"""
import datetime
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from gpu_common import SKIP, require_gpu, start_consumer, wait_wanted  # noqa: E402

torch = require_gpu()
try:
    import transformers  # noqa: F401
except ImportError as e:
    print("SKIP: transformers: %s" % e)
    sys.exit(SKIP)
import bench_gpu_hf as bh  # noqa: E402  (the model and cache of the overhead benchmark)
from attnx import graph as G  # noqa: E402
from attnx.hf import HFExporter  # noqa: E402

PROMPT = bh.PROMPT
STEPS = int(os.environ.get("AX_HC_STEPS", "256"))
REPS = int(os.environ.get("AX_HC_REPS", "3"))
BATCHES = [int(b) for b in os.environ.get("AX_HC_BATCH", "1,32").split(",") if b]
L = bh.LAYERS
AUTO = sorted({L // 4, L // 2, 3 * L // 4, L - 1})

MODES = {
    "off": dict(hook=False),
    "on": dict(),
    "wrap": dict(wrap=True),
    "empty": dict(flags=G.DBG_EMPTY),
    "fence-gpu": dict(flags=G.DBG_FENCE_GPU),
    "ctl-dev": dict(flags=G.DBG_CTL_DEV),
    "seg-dev": dict(flags=G.DBG_SEG_DEV | G.DBG_CTL_DEV),
    "no-qcopy": dict(flags=G.DBG_NO_QCOPY),
    "opt": dict(flags=G.OPT_FEWER),
    "steps-only": dict(layers=[L - 1]),
    "unfused": dict(fuse=False),
    "side": dict(side=True),
    "side-small": dict(side=True, flags=G.OPT_SMALL),
    "side-small-opt": dict(side=True, flags=G.OPT_SMALL | G.OPT_FEWER),
    "side-empty": dict(side=True, flags=G.DBG_EMPTY),
    "defer": dict(defer=True),
    "defer-opt": dict(defer=True, flags=G.OPT_FEWER),
    "side-defer": dict(side=True, defer=True),
    "side-defer-opt": dict(side=True, defer=True, flags=G.OPT_FEWER),  # the HF hook's defaults under graphs
    "side-defer-small-opt": dict(side=True, defer=True, flags=G.OPT_SMALL | G.OPT_FEWER),
}
# run 1 (H200, ea450fb) measured them all; by default now the ones that decide the layout (AX_HC_MODES=all: every one)
DEFAULT_MODES = ["on", "steps-only", "opt", "side", "side-empty", "defer", "defer-opt", "side-defer", "side-defer-opt",
                 "side-defer-small-opt"]
ALL_FLAG_SETS = [("none", 0), ("empty", G.DBG_EMPTY), ("fence-gpu", G.DBG_FENCE_GPU), ("ctl-dev", G.DBG_CTL_DEV),
                 ("seg-dev", G.DBG_SEG_DEV | G.DBG_CTL_DEV), ("no-qcopy", G.DBG_NO_QCOPY), ("opt", G.OPT_FEWER),
                 ("opt+fence-gpu", G.OPT_FEWER | G.DBG_FENCE_GPU), ("small", G.OPT_SMALL),
                 ("small+opt", G.OPT_SMALL | G.OPT_FEWER)]
FLAG_SETS = ALL_FLAG_SETS if os.environ.get("AX_HC_MODES") == "all" else [
    f for f in ALL_FLAG_SETS if f[0] in ("none", "empty", "seg-dev", "opt", "small+opt")]


def apply(ax, name):
    m = MODES[name]
    ax.set_enabled(m.get("hook", True))
    ax.disabled = bool(m.get("wrap", False))
    ax.fuse = m.get("fuse", True)
    ax.set_export_layers(m.get("layers"))
    ax.set_side(m.get("side", False))
    ax.defer = m.get("defer", False)
    ax.g.debug(m.get("flags", 0))


def reset(ax):
    ax.disabled = False
    ax.defer = False
    ax.fuse = True
    ax.set_export_layers(None)
    ax.set_side(False)
    ax.g.debug(0)
    ax.set_enabled(True)


def prepare(model, cache, B, ax):
    """Prefill, 3 eager steps on a side stream, capture one decode step; returns (graph, step)."""
    cache.reset()
    if ax is not None:
        ax.rids = ["hc-%d" % i for i in range(B)]
    prompt = torch.randint(0, 32000, (B, PROMPT), device="cuda")
    with torch.no_grad():
        o = model(prompt, past_key_values=cache, use_cache=True, cache_position=torch.arange(PROMPT, device="cuda"),
                  position_ids=torch.arange(PROMPT, device="cuda")[None].expand(B, -1))
        ids = o.logits[:, -1:].argmax(-1)
        pos = torch.full((B, 1), PROMPT, device="cuda")
        cp = torch.tensor([PROMPT], device="cuda")

        def step():
            lo = model(ids, past_key_values=cache, use_cache=True, cache_position=cp, position_ids=pos).logits
            ids.copy_(lo[:, -1:].argmax(-1))
            pos.add_(1)
            cp.add_(1)

        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                step()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            step()
    return g


def run(model, cache, B, ax, steps):
    g = prepare(model, cache, B, ax)
    t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0.record()
    for _ in range(steps):
        g.replay()
    t1.record()
    torch.cuda.synchronize()
    if ax is not None:
        ax.end_all()
    return B * steps / (t0.elapsed_time(t1) / 1e3)


def model_part(model, cache, B, ax, modes):
    res = {m: [] for m in modes}
    for rep in range(REPS):
        k = rep % len(modes)
        for m in modes[k:] + modes[:k]:
            apply(ax, m)
            res[m].append(run(model, cache, B, ax if m != "off" else None, STEPS))
    reset(ax)
    rows = []
    off = res["off"]
    us_off = 1e6 * B / statistics.median(off)
    for m in modes[1:]:
        ratios = [x / o for x, o in zip(res[m], off)]
        us = 1e6 * B / statistics.median(res[m])
        rows.append("| %d | %s | %.1f | %.1f | %.4f | %.1f | %s |" % (
            B, m, statistics.median(off), statistics.median(res[m]), statistics.median(ratios), us - us_off,
            " ".join("%.4f" % r for r in ratios)))
    return rows


# ---- micro: the export kernels alone ------------------------------------------------------------------------------

def drain(ax, timeout=3.0):
    h = ax.ex.header
    t = time.time() + timeout
    while h.consumer_tail < h.ring_head and time.time() < t:
        time.sleep(0.005)


def micro(ax, B, n_steps=32):
    """µs per repetition of each kernel set, per flag set (graphs of n_steps repetitions, replayed)."""
    dev = "cuda"
    q = torch.randn(B, 1, 32, 128, dtype=torch.bfloat16, device=dev).transpose(1, 2)  # [B, H, 1, D] as HF's view
    st = (q.stride(0), q.stride(2), q.stride(1))
    pos = torch.full((B, 1), PROMPT + 2, dtype=torch.int64, device=dev)
    ids = torch.zeros((B, 1), dtype=torch.int64, device=dev)
    a = G.StepArgs()
    a.n_rows, a.flags, a.n_tok_const = B, 0, 1
    a.seq_end = G.ivec(pos, stride=pos.stride(0), add=1)
    a.tokens, a.token_bytes, a.tok_stride_b, a.tok_stride_t = ids.data_ptr(), 8, ids.stride(0), ids.stride(1)
    prompt = torch.zeros(PROMPT, dtype=torch.int64, device=dev)
    g = ax.g
    g.debug(0)
    for b in range(B):
        g.request_begin("micro-%d" % b, prompt, prompt_len=PROMPT, row=b)
    sets = {
        "step": lambda: ([g.step_begin_q(a, 0, q, *st)] + [g.export_q(l, q, *st) for l in range(1, L - 1)] +
                         [g.export_q_publish(L - 1, q, *st)]),
        "begin_q": lambda: g.step_begin_q(a, 0, q, *st),
        "export_q": lambda: g.export_q(AUTO[0], q, *st),
        "begin_q+q_publish": lambda: (g.step_begin_q(a, 0, q, *st), g.export_q_publish(L - 1, q, *st)),
        "step_all": lambda: g.step_all(a, list(range(L)), [q] * L, *st),
    }
    reps = max(2, min(20, 1024 // (n_steps * B)))
    rows = []
    for fname, flags in FLAG_SETS:
        g.debug(flags)
        cells = []
        for sname, fn in sets.items():
            if sname == "export_q":
                fn_pre = sets["begin_q"]
                fn_pre()  # a step begun (active) and never published: each copy copies
            torch.cuda.synchronize()
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                fn()
            torch.cuda.current_stream().wait_stream(s)
            gr = torch.cuda.CUDAGraph()
            with torch.cuda.graph(gr):
                for _ in range(n_steps):
                    fn()
            gr.replay()
            torch.cuda.synchronize()
            drain(ax)
            t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0.record()
            for _ in range(reps):
                gr.replay()
            t1.record()
            torch.cuda.synchronize()
            cells.append(1e3 * t0.elapsed_time(t1) / (reps * n_steps))
            del gr
            drain(ax)
        rows.append("| %d | %s | %s |" % (B, fname, " | ".join("%.2f" % c for c in cells)))
    g.debug(0)
    g.step_begin_q(a, 0, q, *st)
    g.export_q_publish(L - 1, q, *st)  # the last begun step published (nothing left active)
    for b in range(B):
        g.request_end(b, "stop")
    torch.cuda.synchronize()
    drain(ax)
    return ["| batch | flags | " + " | ".join("%s µs" % k for k in sets) + " |",
            "|---|---|" + "---|" * len(sets)] + rows


# ---- profile: one replayed step, kernel by kernel -------------------------------------------------------------------

def profile(model, cache, B, ax, modes, out):
    try:
        from torch.profiler import ProfilerActivity, profile as tprofile
    except ImportError as e:
        return ["(torch.profiler unavailable: %s)" % e]
    lines, detail = [], []
    for m in modes:
        apply(ax, m)
        g = prepare(model, cache, B, ax if m != "off" else None)
        torch.cuda.synchronize()
        path = os.path.join(out or "/tmp", "trace-%s-b%d.json" % (m, B))
        try:
            with tprofile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(3):
                    g.replay()
                torch.cuda.synchronize()
            prof.export_chrome_trace(path)
            with open(path) as f:
                ev = json.load(f)
            ev = ev.get("traceEvents", ev) if isinstance(ev, dict) else ev
        except Exception as e:  # the profiler is a bonus: never fail the measurement on it
            lines.append("(profile %s: %s: %s)" % (m, type(e).__name__, e))
            if m != "off":
                ax.end_all()
            continue
        if m != "off":
            ax.end_all()
        ks = sorted((e for e in ev if e.get("cat") == "kernel" and "dur" in e), key=lambda e: e["ts"])
        if not ks:
            lines.append("(profile %s: no kernel events in the trace)" % m)
            continue
        n = len(ks) // 3
        one = ks[2 * n:]  # the last replay
        t0 = one[0]["ts"]
        end = max(e["ts"] + e["dur"] for e in one)
        ours = [e for e in one if e["name"].startswith("k_") or "k_step" in e["name"] or "k_export" in e["name"] or
                "k_nop" in e["name"]]
        summary = ("profile %s, batch %d: %d kernels per replay, span %.1f µs, attnx kernels %d, their summed "
                   "duration %.1f µs" % (m, B, len(one), end - t0, len(ours), sum(e["dur"] for e in ours)))
        lines.append(summary)
        detail.append(summary)
        prev_end = t0
        detail.append("  #  start µs   dur µs   gap µs  stream  kernel")
        for i, e in enumerate(one):
            detail.append("  %3d %8.1f %8.2f %8.2f  %5s  %s" % (i, e["ts"] - t0, e["dur"], e["ts"] - prev_end,
                                                               e.get("tid", "?"), e["name"][:90]))
            prev_end = max(prev_end, e["ts"] + e["dur"])
    reset(ax)
    if out:
        with open(os.path.join(out, "profile-export.txt"), "w") as f:
            f.write("\n".join(detail) + "\n")
    return lines


def report(head, model_rows, micro_rows, prof_lines, stats, t_start, out, final=False):
    """The report so far (written after every part: a crash in a later part, the profiler's say, keeps the rest)."""
    lines = list(head)
    lines += ["", "Model: decode tok/s, graphs on. µs/step = mode − off at the medians (positive: the hook's cost).",
              "| batch | mode | off tok/s | mode tok/s | mode/off (median of rounds) | µs/step | per round |",
              "|---|---|---|---|---|---|---|"] + model_rows
    lines += ["", "Micro: export kernels alone in a graph (32 repetitions per replay), µs per repetition. step = "
              "begin_q + %d copies + q_publish." % (L - 2)] + micro_rows
    lines += [""] + prof_lines
    lines += ["(batch %d exporter counters: %s)" % st for st in stats]
    lines.append("total %.0f s%s" % (time.time() - t_start, "" if final else " (so far)"))
    text = "\n".join(lines)
    if out:
        with open(os.path.join(out, "bench-export.txt"), "w") as f:
            f.write(text + "\n")
    return text


def main():
    out = os.environ.get("OUT")
    model = bh.model_()
    modes = os.environ.get("AX_HC_MODES")
    modes = list(MODES) if modes == "all" else modes.split(",") if modes else DEFAULT_MODES
    modes = ["off"] + [m for m in modes if m in MODES and m != "off"]
    head = ["attnx hook cost: %s, %s, Qwen3-shaped %d layers bf16, prompt %d, %d steps, %d rounds (rotated), "
            "consumer wants layers %s" % (torch.cuda.get_device_name(), datetime.date.today(), L, PROMPT, STEPS,
                                          REPS, AUTO)]
    t_start = time.time()
    model_rows, micro_rows, prof_lines, stats = [], [], [], []

    def progress():
        report(head, model_rows, micro_rows, prof_lines, stats, t_start, out)

    for B in BATCHES:
        max_len = PROMPT + STEPS + 8
        cache = bh.cache_(model, B, max_len)
        shm = "/attnx.hc%d.%d" % (os.getpid(), B)
        ax = HFExporter(model, cache, batch_size=B, max_cache_len=max_len, name=shm, inner="sdpa")
        ax.warmup()
        cons = start_consumer(shm, os.devnull, layers=",".join(map(str, AUTO)), prefill=False, ends=1 << 40,
                              timeout=1800, topk=-1)
        try:
            wait_wanted(ax.g)
            t = time.time()
            rows = model_part(model, cache, B, ax, modes)
            model_rows += rows
            print("batch %d model part: %.0f s\n%s" % (B, time.time() - t, "\n".join(rows)), flush=True)
            progress()
            t = time.time()
            micro_rows += micro(ax, B)
            print("batch %d micro part: %.0f s" % (B, time.time() - t), flush=True)
            progress()
            if B == 1 and os.environ.get("AX_HC_PROFILE", "1") != "0":
                t = time.time()
                prof_lines += profile(model, cache, B, ax, ["off", "on", "defer-opt", "side-defer-opt"], out)
                print("batch %d profile part: %.0f s" % (B, time.time() - t), flush=True)
                progress()
            stats.append((B, ax.g.stats()))
        finally:
            ax.close()
            cons.kill()
            cons.wait()
        ax.set_enabled(False)
    print(report(head, model_rows, micro_rows, prof_lines, stats, t_start, out, final=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
