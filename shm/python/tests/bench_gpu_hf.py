#!/usr/bin/env python3
"""Benchmark: decode tokens/s of a Qwen3-shaped model (32 query heads, 8 KV heads, head_dim 128, hidden 4096,
bf16, random weights, AX_BENCH_LAYERS layers, default 8) at batch 1 and 32, attnx hook off vs on, CUDA graphs on
and off. Hook on = attnx.hf.HFExporter with a consumer attached that wants the capture's `--layers auto` set
(L/4, L/2, 3L/4, L-1) and drains descriptors without computing (the engine-side cost alone; a real
attnx-capture's GPU work competes for the same card and is measured by its own benchmarks). Exit 77 without a
GPU. First run: H200, 2026-11-27, 3a279e1 (median of 3; batch 1 graphs on 0.981, batch 32 0.990). Now AX_BENCH_REPS
rounds (default 7), each running every mode once in an order rotated round by round; the table gives the medians,
the median of the per-round ratios (each pair ran back to back) and every round's ratio, so noise shows. With graphs
on two more modes: "on-inline" (HFExporter.set_side(False): the export kernel on the engine's stream; "on" is the
hook's default, which puts it on a side stream while a graph is captured) and "on-layers"
(HFExporter.set_export_layers(the consumer's layers): layers nobody asked for get no Q-copy kernel). Session 3's
"on-unfused" mode (fuse=False) is gone: bench_gpu_export.py measures it with the other variants. About 2-3 minutes
on an H200. Prints a table; writes it to $OUT/bench-hf.txt too when OUT is set. Goal (issue 6): hook on ≥ 0.99 × off
with graphs on.
"""
import datetime
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_common import SKIP, require_gpu, start_consumer, wait_wanted  # noqa: E402

torch = require_gpu()
try:
    from transformers import AutoModelForCausalLM, Qwen3Config, StaticCache
except ImportError as e:
    print("SKIP: transformers: %s" % e)
    sys.exit(SKIP)
from attnx.hf import HFExporter, defer_default, side_default  # noqa: E402

LAYERS = int(os.environ.get("AX_BENCH_LAYERS", "8"))
PROMPT, STEPS = 128, int(os.environ.get("AX_BENCH_STEPS", "128"))
REPS = int(os.environ.get("AX_BENCH_REPS", "7"))


def model_():
    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=32000, hidden_size=4096, intermediate_size=12288, num_hidden_layers=LAYERS,
                      num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=8192,
                      attn_implementation="sdpa")
    with torch.device("cuda"):
        return AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.bfloat16).eval()


def cache_(model, B, max_len):
    try:
        return StaticCache(config=model.config, max_batch_size=B, max_cache_len=max_len, device="cuda",
                           dtype=model.dtype)
    except TypeError:
        return StaticCache(config=model.config, max_cache_len=max_len)


def run(model, cache, B, graph, ax=None):
    """Prefill, then STEPS greedy decode steps; returns decode tokens/s (CUDA events)."""
    cache.reset()
    if ax is not None:
        ax.rids = ["bench-%d" % i for i in range(B)]
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
        g = None
        if graph:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                step()
        t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0.record()
        for _ in range(STEPS):
            g.replay() if graph else step()
        t1.record()
        torch.cuda.synchronize()
    if ax is not None:
        ax.end_all()
    return B * STEPS / (t0.elapsed_time(t1) / 1e3)


# graphs on: also "on-inline" (HFExporter.set_side(False): the export kernels on the engine's stream, the layout
# before session 4) and "on-layers" (HFExporter.set_export_layers(the consumer's layers): no Q-copy kernel for the
# layers nobody asked for)
MODES = {True: ("off", "on", "on-inline", "on-layers"), False: ("off", "on")}


def measure(model, cache, B, ax, auto):
    """REPS rounds; each round runs every mode once, the order rotated round by round (off first, then on
    first, ...) so that drift (clocks, temperature, the consumer's start-up) does not favour one mode. Returns
    {graphs: {mode: [tok/s per round]}}."""
    res = {gr: {m: [] for m in MODES[gr]} for gr in MODES}
    side = ax.side  # the default (attnx.hf.side_default(): "capture" unless ATTNX_HF_SIDE says otherwise)
    for gr in (True, False):
        modes = MODES[gr]
        for rep in range(REPS):
            k = rep % len(modes)
            for m in modes[k:] + modes[:k]:
                ax.set_enabled(m != "off")
                ax.set_side(False if m == "on-inline" else side)
                ax.set_export_layers(auto if m == "on-layers" else None)
                res[gr][m].append(run(model, cache, B, gr, ax if m != "off" else None))
    ax.set_enabled(True)
    ax.set_side(side)
    ax.set_export_layers(None)
    return res


def table_rows(B, res):
    rows = []
    for gr in (True, False):
        off = res[gr]["off"]
        for m in MODES[gr][1:]:
            ratios = [x / o for x, o in zip(res[gr][m], off)]  # same round: the pair ran back to back
            rows.append("| %d | %s | %s | %.1f | %.1f | %.4f | %.4f | %s |" % (
                B, "on" if gr else "off", m, statistics.median(off), statistics.median(res[gr][m]),
                statistics.median(res[gr][m]) / statistics.median(off), statistics.median(ratios),
                " ".join("%.3f" % r for r in ratios)))
    return rows


def main():
    model = model_()
    L = LAYERS
    auto = sorted({L // 4, L // 2, 3 * L // 4, L - 1})
    rows, stats = [], []
    t0 = time.time()
    for B in (1, 32):
        max_len = PROMPT + STEPS + 8
        cache = cache_(model, B, max_len)
        shm = "/attnx.bench%d.%d" % (os.getpid(), B)
        ax = HFExporter(model, cache, batch_size=B, max_cache_len=max_len, name=shm, inner="sdpa")
        ax.warmup()
        cons = start_consumer(shm, os.devnull, layers=",".join(map(str, auto)), prefill=False, ends=1 << 40,
                              timeout=1200, topk=-1)
        try:
            wait_wanted(ax.g)
            res = measure(model, cache, B, ax, auto)
            stats.append((B, ax.g.stats()))
        finally:
            ax.close()
            cons.kill()
            cons.wait()
        ax.set_enabled(False)  # the model back to its own attention for the next batch size
        rows += table_rows(B, res)
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = "?"
    lines = ["attnx HF hook decode benchmark: %s, %s, commit %s, Qwen3-shaped %d layers bf16, prompt %d, %d steps, "
             "%d rounds (modes alternating), %.0f s" % (torch.cuda.get_device_name(), datetime.date.today(), commit,
                                                       L, PROMPT, STEPS, REPS, time.time() - t0),
             "on = the hook's defaults (side=%r, defer=%r: with graphs, one export kernel per decode step, at the "
             "last layer, on a side stream), on-inline = the same on the engine's stream, on-layers = on with only "
             "the consumer's layers %s exportable" % (side_default(), defer_default(), auto),
             "| batch | CUDA graphs | hook | off tok/s | on tok/s | on/off (medians) | on/off (median of rounds) | "
             "per-round on/off |", "|---|---|---|---|---|---|---|---|"] + rows
    lines += ["(batch %d exporter counters: %s)" % st for st in stats]
    text = "\n".join(lines)
    print(text)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "bench-hf.txt"), "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
