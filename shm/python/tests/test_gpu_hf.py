#!/usr/bin/env python3
"""GPU test of the Hugging Face hook (attnx.hf) — exit 77 without torch / transformers / CUDA. Passed on an H200 at
3a279e1 and on an H100 at 3939a6e; failed on H100s between (after d3f5a42 (0 rows: wait_wanted returned when the reference consumer attached, before
it asked for rows; fixed in gpu_common, replayed on the CPU by test_hf_hook_logic.py)); scripts/gpu-test runs it.

For the shipped model (engine/models/attnx-tiny) and a randomly initialised Qwen3-shaped model (32 query heads,
8 KV heads, head_dim 128; f32 so that 1e-3 means something), each:
  1. greedy generate() with a static cache, without the hook, then with it: the generations must be identical;
  2. while hooked, the reference consumer (gpu_common.py: a second process, libattnx-export's consumer API and
     the capture's CUDA importer) computes every head's probabilities for every exported (position, layer): they
     must equal transformers' eager output_attentions of the whole sequence within 1e-3, every position 0..n-2
     and layer exactly once, with the right token ids and decode steps;
  3. when AX_BUILD_DIR holds attnx-capture (with --backend cuda), attnx-relay and attnx-tail, the same generate()
     with the real capture in heads mode: every record's exp(topk_logit - logsumexp_all) against the same
     reference within 1e-3. Otherwise this part prints SKIP (and the test still passes on parts 1-2).
Then the CUDA-graph part: a decode loop captured in torch.cuda.graph and replayed ≥ 1000 times, against the same
loop run eagerly: every position's descriptor arrives once (no duplicates, no losses) and each head's top-5
positions and probabilities match the eager run.
A failed check prints what the reference consumer wrote (line counts, its ready and exit lines, the first step lines
with their layers and q_row) and the exporter's side (device counters, what its kernels see), so that a GPU failure
explains itself.
"""
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_common import SKIP, consumer_report, load, require_gpu, start_consumer, wait_wanted  # noqa: E402

torch = require_gpu()
try:
    import transformers  # noqa: F401
    from transformers import AutoModelForCausalLM, Qwen3Config, StaticCache
except ImportError as e:
    print("SKIP: transformers: %s" % e)
    sys.exit(SKIP)

from attnx.hf import HFExporter  # noqa: E402

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", ".."))
TINY = os.path.join(ROOT, "engine", "models", "attnx-tiny")
TOL = 1e-3
failures = []


def check(cond, msg):
    if not cond:
        failures.append(msg)
        print("FAIL: " + msg)


def random_qwen3(layers=2):
    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=4096, hidden_size=1024, intermediate_size=2048, num_hidden_layers=layers,
                      num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=4096,
                      attn_implementation="eager")
    return AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32).cuda().eval()


def static_cache(model, max_len):
    try:
        return StaticCache(config=model.config, max_batch_size=1, max_cache_len=max_len, device="cuda",
                           dtype=model.dtype)
    except TypeError:  # newer signatures
        return StaticCache(config=model.config, max_cache_len=max_len)


def generate(model, cache, ids, n):
    cache.reset()
    with torch.no_grad():
        out = model.generate(ids, past_key_values=cache, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             disable_compile=True)
    return out[0].tolist()


def eager_reference(model, seq):
    """attentions[l][h][p][j] of the whole sequence, transformers eager, no cache."""
    model.set_attn_implementation("eager")
    with torch.no_grad():
        o = model(torch.tensor([seq], device="cuda"), output_attentions=True, use_cache=False)
    return [a[0].double() for a in o.attentions]  # [H, S, S] per layer


def exporter_report(ax):
    """The exporter's side for a failure message: device counters and what the kernels see now."""
    try:
        torch.cuda.synchronize()
        return "exporter: device counters %r; kernels see %r; hook disabled %r" % (ax.g.stats(), ax.g.enabled(),
                                                                                   ax.disabled)
    except Exception as e:  # the diagnostics must not hide the failure
        return "exporter: (no report: %s)" % e


def explain_on_failure(n_before, what, lines, exporter):
    """Print the consumer's and the exporter's side when checks since n_before failed."""
    if len(failures) > n_before:
        print("%s: what the consumer wrote\n%s\n%s" % (what, consumer_report(lines), exporter))


def compare_consumer(lines, ref, seq, P, what):
    attn = [r for r in lines if r["t"] == "attn"]
    seen = set()
    worst = 0.0
    for r in attn:
        key = (r["position"], r["layer"])
        check(key not in seen, "%s: duplicate %r" % (what, key))
        seen.add(key)
        p, l = key
        check(r["token"] == seq[p], "%s: token at %d is %r, expected %r" % (what, p, r["token"], seq[p]))
        got = torch.tensor(r["probs"], dtype=torch.float64, device="cuda")       # [H, p+1]
        want = ref[l][:, p, :p + 1]
        worst = max(worst, (got - want).abs().max().item())
    check(worst < TOL, "%s: worst |p - eager| = %.3g" % (what, worst))
    L = len(ref)
    expected = {(p, l) for p in range(len(seq) - 1) for l in range(L)}
    check(seen == expected, "%s: %d (position, layer) rows, expected %d; missing %r" %
          (what, len(seen), len(expected), sorted(expected - seen)[:5]))
    steps = [r for r in lines if r["t"] == "step" and not r["prefill"]]
    for s in steps:
        check(s["decode_step"] == s["pos0"] - P + 1, "%s: decode_step %d at %d" % (what, s["decode_step"], s["pos0"]))
    check(not any(r["t"] == "lost" for r in lines), "%s: descriptors lost" % what)
    print("%s: %d rows, worst |p - eager| %.2e" % (what, len(attn), worst))


def capture_chain(shm, model, cache, ax, ids, n, ref, seq, what):
    build = os.environ.get("AX_BUILD_DIR", os.path.join(ROOT, "build-gpu"))
    bins = [os.path.join(build, p) for p in ("capture/attnx-capture", "relay/attnx-relay", "tail/attnx-tail")]
    if not all(os.path.exists(b) for b in bins):
        print("%s: attnx-capture chain: SKIP (not built in %s)" % (what, build))
        return
    try:  # a build without the CUDA backend refuses --backend cuda at once with status 2
        rc = subprocess.run([bins[0], "--backend", "cuda", "--shm", "/attnx.none%d" % os.getpid(), "--policy", "",
                             "--records", "ipc:///tmp/attnx-none.sock"], capture_output=True, timeout=2).returncode
    except subprocess.TimeoutExpired:
        rc = None  # it started and waits for the segment: the backend is there
    if rc is not None:
        print("%s: attnx-capture chain: SKIP (attnx-capture --backend cuda exits %d)" % (what, rc))
        return
    d = tempfile.mkdtemp(prefix="attnx-gpu")
    rec, pol, feed = ("ipc://%s/%s.sock" % (d, x) for x in ("rec", "pol", "feed"))
    procs = [subprocess.Popen([bins[1], "--listen", "127.0.0.1:0", "--records", rec, "--policy", pol, "--feed",
                               feed, "--upstream", "http://127.0.0.1:9", "--log-level", "warn"])]
    try:
        time.sleep(0.5)
        tail_out = os.path.join(d, "tail.jsonl")
        procs.append(subprocess.Popen([bins[2], "--feed", feed, "--timeout", "60000"], stdout=open(tail_out, "w")))
        time.sleep(0.3)
        procs.append(subprocess.Popen([bins[0], "--backend", "cuda", "--shm", shm, "--records", rec, "--policy", "",
                                       "--mode", "heads", "--layers", "all", "--top-k", "5", "--prefill",
                                       "--stats-interval", "0", "--log-level", "warn"]))
        wait_wanted(ax.g)
        rid = "ax-%016x" % random.getrandbits(64)
        ax.rids = [rid]
        generate(model, cache, ids, n)
        ax.end_all()
        end = time.time() + 30
        recs = []
        while time.time() < end:
            recs = load(tail_out)
            if any(r.get("t") == "end" and r.get("rid") == rid for r in recs):
                break
            time.sleep(0.1)
        attn = [r for r in recs if r.get("t") == "attn" and r.get("rid") == rid]
        worst, keys = 0.0, set()
        for r in attn:
            p, l, h = r["position"], r["layer_id"], r["head_id"]
            keys.add((p, l, h))
            for j, lg in zip(r["token_positions"], r["topk_logits"]):
                worst = max(worst, abs(torch.tensor(lg - r["logsumexp_all"], dtype=torch.float64).exp().item()
                                       - ref[l][h, p, j].item()))
        H = ref[0].shape[0]
        want = {(p, l, h) for p in range(len(seq) - 1) for l in range(len(ref)) for h in range(H)}
        check(keys == want, "%s chain: %d records, expected %d" % (what, len(keys), len(want)))
        check(worst < TOL, "%s chain: worst |p - eager| = %.3g" % (what, worst))
        print("%s: attnx-capture chain: %d heads records, worst %.2e" % (what, len(attn), worst))
    finally:
        for p in reversed(procs):
            p.send_signal(signal.SIGTERM)
            p.wait()
        shutil.rmtree(d, ignore_errors=True)


def hf_case(what, model, ids, n=24):
    shm = "/attnx.gputest%d" % os.getpid()
    max_len = ids.shape[1] + n + 8
    model.set_attn_implementation("eager")
    cache = static_cache(model, max_len)
    plain = generate(model, cache, ids, n)
    ax = HFExporter(model, cache, batch_size=1, max_cache_len=max_len, name=shm, inner="eager")
    try:
        ax.warmup()
        out = tempfile.mktemp(suffix=".jsonl")
        cons = start_consumer(shm, out, ends=1)
        wait_wanted(ax.g, out=out, cons=cons)  # the consumer's own wish, not its arrival
        ax.rids = ["ax-%016x" % random.getrandbits(64)]
        hooked = generate(model, cache, ids, n)
        ax.end_all()
        cons.wait(120)
        check(hooked == plain, "%s: generation differs with the hook" % what)
        ref = eager_reference(model, hooked)
        n_before, lines = len(failures), load(out)
        compare_consumer(lines, ref, hooked, ids.shape[1], what)
        explain_on_failure(n_before, what, lines, exporter_report(ax))
        model.set_attn_implementation("attnx")
        capture_chain(shm, model, cache, ax, ids, n, ref, hooked, what)
    finally:
        ax.close()
        model.set_attn_implementation("eager")


def decode_loop(model, ax, cache, prompt, steps, graph):
    """Greedy decode with static tensors; returns the tokens. graph: capture one step, replay it."""
    P = len(prompt)
    cache.reset()
    ax.rids = ["ax-graph-%d" % int(graph)]
    with torch.no_grad():
        o = model(torch.tensor([prompt], device="cuda"), past_key_values=cache, use_cache=True,
                  cache_position=torch.arange(P, device="cuda"), position_ids=torch.arange(P, device="cuda")[None])
        ids = o.logits[:, -1:].argmax(-1)
        pos = torch.tensor([[P]], device="cuda")
        cp = torch.tensor([P], device="cuda")
        toks = [ids]

        def step():
            lo = model(ids, past_key_values=cache, use_cache=True, cache_position=cp, position_ids=pos).logits
            ids.copy_(lo[:, -1:].argmax(-1))
            pos.add_(1)
            cp.add_(1)

        if not graph:
            for _ in range(steps):
                step()
                toks.append(ids.clone())
        else:
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):  # two eager warm-up steps (exported like any other)
                for _ in range(2):
                    step()
                    toks.append(ids.clone())
            torch.cuda.current_stream().wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                step()
            for _ in range(steps - 2):
                g.replay()
                toks.append(ids.clone())
        torch.cuda.synchronize()
    ax.end_all()
    return [prompt[i] for i in range(P)] + [t.item() for t in toks]


def graph_case(steps=1100):
    model = random_qwen3(layers=2)
    shm = "/attnx.gputestg%d" % os.getpid()
    prompt = [random.randrange(4096) for _ in range(8)]
    max_len = len(prompt) + steps + 8
    cache = static_cache(model, max_len)
    ax = HFExporter(model, cache, batch_size=1, max_cache_len=max_len, name=shm, inner="sdpa")
    runs, reports = {}, {}
    try:
        ax.warmup()
        for graph in (False, True):
            out = tempfile.mktemp(suffix=".jsonl")
            cons = start_consumer(shm, out, layers="1", prefill=False, ends=1, timeout=600, topk=5)
            wait_wanted(ax.g, out=out, cons=cons)  # layer 1, no prefill: this consumer's wish, not the last one's
            seq = decode_loop(model, ax, cache, prompt, steps, graph)
            cons.wait(600)
            runs[graph] = (seq, load(out))
            reports[graph] = exporter_report(ax)
    finally:
        ax.close()
    layout = "side=%r defer=%r, %d side-stream forks" % (ax.side, ax.defer, ax._streams.forks)  # which layout ran
    (s0, l0), (s1, l1) = runs[False], runs[True]
    check(s0 == s1, "graph: the replayed decode generated other tokens")
    P = len(prompt)
    for graph, name, lines in ((False, "eager", l0), (True, "graph", l1)):
        n_before = len(failures)
        pos = [r["position"] for r in lines if r["t"] == "attn"]
        check(sorted(pos) == list(range(P - 1, P + steps)) and len(set(pos)) == len(pos),
              "graph (%s run): positions %d..%d not each exactly once (%d rows)" % (name, P - 1, P + steps - 1,
                                                                                      len(pos)))
        check(not any(r["t"] == "lost" for r in lines), "graph (%s run): descriptors lost" % name)
        explain_on_failure(n_before, "graph (%s run)" % name, lines, reports[graph])
    a0 = {r["position"]: r for r in l0 if r["t"] == "attn"}
    worst = 0.0
    for r in l1:
        if r["t"] != "attn" or r["position"] not in a0:
            continue
        e = a0[r["position"]]
        check(r["top_pos"] == e["top_pos"], "graph: top-5 differ at %d" % r["position"])
        worst = max(worst, max(abs(x - y) for a, b in zip(r["top_prob"], e["top_prob"]) for x, y in zip(a, b)))
    check(worst < 1e-4, "graph: worst probability difference vs eager %.3g" % worst)
    print("graph: %d replays, %d and %d rows (eager, graph), worst diff %.2e (%s)" % (
        steps - 2, len(a0), sum(1 for r in l1 if r["t"] == "attn"), worst, layout))


def main():
    random.seed(7)
    if os.path.exists(os.path.join(TINY, "config.json")):
        model = AutoModelForCausalLM.from_pretrained(TINY, torch_dtype=torch.float32).cuda().eval()
        ids = torch.tensor([[random.randrange(model.config.vocab_size) for _ in range(12)]], device="cuda")
        hf_case("attnx-tiny", model, ids)
        del model
    else:
        print("attnx-tiny: SKIP (no %s)" % TINY)
    model = random_qwen3(layers=2)
    ids = torch.tensor([[random.randrange(4096) for _ in range(12)]], device="cuda")
    hf_case("qwen3-shaped", model, ids)
    del model
    graph_case()
    print("FAILED: %d" % len(failures) if failures else "PASS")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
