"""axpipe — start attnx-engine, attnx-capture, attnx-relay and attnx-tail on private addresses (stdlib only).

Used by scripts/compare-transformers, scripts/bench-engine and engine/tools/show-attention. Every run gets its own
shm name, ipc socket paths and TCP ports (derived from the pid), so it never touches a demo or another test on the
same machine. The engine is reached directly over HTTP (requests carry our own `rid`), so the capture applies its
command-line settings. Records reach us one of two ways:

* sink="relay": attnx-relay PULLs the capture's frames and re-publishes them on its feed, which attnx-tail prints
  as JSON lines that a reader thread collects by rid (the deployment's path).
* sink="pull": an nng PULL socket of our own (libnng through ctypes) keeps every frame in memory; `records()`
  decodes them with `attnx-tail --replay`. Nothing is re-published, so nothing can be dropped downstream of the
  capture (the relay drops capture frames when it falls behind a burst; see engine/FIDELITY.md).

    with Pipeline(build, model, capture=["--mode", "heads", "--layers", "all"]) as p:
        p.completion({"prompt": "Hello", "max_tokens": 8, "temperature": 0}, rid="x1")
        recs = p.records("x1")   # waits for the request's `end` record
"""
import ctypes
import http.client
import json
import os
import signal
import socket
import subprocess
import tempfile
import threading
import time


class PullSink:
    """nng PULL listening on `url`; a thread appends every received message (one frame) to self.frames."""

    def __init__(self, url):
        self.lib = ctypes.CDLL("libnng.so.1")
        self.sock = ctypes.c_uint32(0)  # nng_socket is struct { uint32_t id; }
        self.frames = []
        self.lock = threading.Lock()
        self.stopping = False
        rv = self.lib.nng_pull0_open(ctypes.byref(self.sock))
        if rv:
            raise OSError("nng_pull0_open: %d" % rv)
        self.lib.nng_socket_set_int(self.sock, b"recv-buffer", 8192)
        self.lib.nng_socket_set_ms(self.sock, b"recv-timeout", 100)
        rv = self.lib.nng_listen(self.sock, url.encode(), None, 0)
        if rv:
            self.lib.nng_close(self.sock)
            raise OSError("nng_listen %s: %d" % (url, rv))
        self.th = threading.Thread(target=self._run, daemon=True)
        self.th.start()

    def _run(self):
        buf, size = ctypes.c_void_p(), ctypes.c_size_t()
        while not self.stopping:
            rv = self.lib.nng_recv(self.sock, ctypes.byref(buf), ctypes.byref(size), 1)  # NNG_FLAG_ALLOC
            if rv:
                continue  # NNG_ETIMEDOUT, or closed
            data = ctypes.string_at(buf, size.value)
            self.lib.nng_free(buf, size)
            with self.lock:
                self.frames.append(data)

    def snapshot(self):
        with self.lock:
            return b"".join(self.frames)

    def close(self):
        self.stopping = True
        self.th.join()
        self.lib.nng_close(self.sock)


_GIVEN = set()


def free_port():
    """A free port, never one this process was given before (two picks in a row can get the same port from the
    kernel: its socket is closed in between)."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _GIVEN:
            _GIVEN.add(port)
            return port
    raise OSError("no free port that was not handed out before")


class Pipeline:
    def __init__(self, build, model, capture=None, engine=None, sink="relay", tag=None, logdir=None):
        """capture: None = no attnx-capture; else its extra arguments. engine: extra engine arguments.
        sink: "relay" (relay + tail), "relay-only" (the relay takes the records, nobody reads its feed), "pull"
        (our own PULL socket) or None (records go nowhere)."""
        self.build, self.model = build, model
        self.tag = tag or "axpipe-%d" % os.getpid()
        self.logdir = logdir or "/tmp"
        self.port = free_port()
        self.shm = "/attnx.%s" % self.tag
        sock = lambda what: "ipc:///tmp/%s-%s.sock" % (self.tag, what)
        self.addr = {"records": sock("records"), "policy": sock("policy"), "feed": sock("feed")}
        self.procs = []
        self.lines = []          # tail records (dicts), in arrival order
        self.cv = threading.Condition()
        self.ended = set()       # rids whose `end` record arrived
        self.sink = None
        self._start(capture, engine or [], sink)

    # -- processes ----------------------------------------------------------------------------------------
    def _spawn(self, name, argv, stdout=None):
        log = open(os.path.join(self.logdir, "%s-%s.log" % (self.tag, name)), "w")
        p = subprocess.Popen(argv, stdout=stdout or log, stderr=log)
        self.procs.append((name, p, log))
        return p

    def _start(self, capture, engine, sink):
        b = self.build
        self.mode = sink
        try:
            self._spawn("engine", [b + "/engine/attnx-engine", "--model", self.model,
                                   "--listen", "127.0.0.1:%d" % self.port, "--shm", self.shm] + engine)
            if sink == "pull":
                self.sink = PullSink(self.addr["records"])
            if sink in ("relay", "relay-only"):
                self._spawn("relay", [b + "/relay/attnx-relay", "--listen", "127.0.0.1:%d" % free_port(),
                                      "--upstream", "http://127.0.0.1:%d" % self.port,
                                      "--records", self.addr["records"], "--policy", self.addr["policy"],
                                      "--feed", self.addr["feed"], "--log-level", "warn"])
            if sink == "relay":
                t = self._spawn("tail", [b + "/tail/attnx-tail", "--feed", self.addr["feed"]],
                                stdout=subprocess.PIPE)
                threading.Thread(target=self._read_tail, args=(t.stdout,), daemon=True).start()
            if capture is not None:
                self._spawn("capture", [b + "/capture/attnx-capture", "--shm", self.shm,
                                        "--records", self.addr["records"], "--policy", self.addr["policy"],
                                        "--stats-interval", "0"] + capture)
            self._wait_http()
            if capture is not None and sink in ("relay", "pull"):
                self._warm_up()
            elif capture is not None:
                self._wait_log("capture", "attached to")
        except BaseException:
            self.close()
            raise

    def _read_tail(self, f):
        for raw in f:
            try:
                rec = json.loads(raw)
            except ValueError:
                continue
            with self.cv:
                self.lines.append(rec)
                if rec.get("t") == "end":
                    self.ended.add(rec.get("rid"))
                self.cv.notify_all()

    def _wait_http(self, timeout=20):
        t0 = time.time()
        while time.time() - t0 < timeout:
            for name, p, _ in self.procs:
                if p.poll() is not None:
                    raise RuntimeError("%s exited with %s (log: %s/%s-%s.log)" %
                                       (name, p.returncode, self.logdir, self.tag, name))
            try:
                if self.get("/health")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError("engine not ready after %d s" % timeout)

    def _wait_log(self, name, text, timeout=20):
        path = os.path.join(self.logdir, "%s-%s.log" % (self.tag, name))
        t0 = time.time()
        while time.time() - t0 < timeout:
            with open(path) as f:
                if text in f.read():
                    return
            time.sleep(0.1)
        raise RuntimeError("%s: no '%s' in %s after %d s" % (name, text, path, timeout))

    def _warm_up(self, timeout=20):
        """Until a request's `end` comes back through capture → relay → tail, every hop is connected."""
        t0 = time.time()
        i = 0
        while time.time() - t0 < timeout:
            rid = "%s-warmup-%d" % (self.tag, i)
            self.completion({"prompt": "warm up", "max_tokens": 2, "temperature": 0}, rid=rid)
            if self.wait_end(rid, 1.0):
                return
            i += 1
        raise RuntimeError("no records reached attnx-tail after %d s" % timeout)

    def close(self):
        for name, p, log in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for name, p, log in reversed(self.procs):
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            log.close()
        self.procs = []
        if self.sink:
            self.sink.close()
            self.sink = None

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.close()

    # -- HTTP ---------------------------------------------------------------------------------------------
    def _conn(self):
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=300)

    def get(self, path):
        c = self._conn()
        c.request("GET", path)
        r = c.getresponse()
        body = r.read()
        c.close()
        return r.status, body

    def post(self, path, body):
        c = self._conn()
        c.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        r = c.getresponse()
        data = r.read()
        c.close()
        if r.status != 200:
            raise RuntimeError("%s: HTTP %d %s" % (path, r.status, data[:300]))
        return json.loads(data)

    def completion(self, body, rid=None, chat=False):
        body = dict(body)
        if rid:
            body["rid"] = rid
        return self.post("/v1/chat/completions" if chat else "/v1/completions", body)

    def stream(self, body, rid=None, chat=False):
        """Streamed request; returns the arrival times (time.perf_counter) of the chunks carrying text."""
        body = dict(body, stream=True)
        if rid:
            body["rid"] = rid
        c = self._conn()
        c.request("POST", "/v1/chat/completions" if chat else "/v1/completions", json.dumps(body),
                  {"Content-Type": "application/json"})
        r = c.getresponse()
        if r.status != 200:
            raise RuntimeError("stream: HTTP %d %s" % (r.status, r.read()[:300]))
        times = []
        for line in r:
            line = line.strip()
            if not line.startswith(b"data: "):
                continue
            if line == b"data: [DONE]":
                break
            ch = json.loads(line[6:])["choices"]
            if ch and (ch[0].get("text") is not None or ch[0].get("delta")):
                times.append(time.perf_counter())
        c.close()
        return times

    # -- records ------------------------------------------------------------------------------------------
    def _replay(self, filters):
        """pull sink: decode the frames received so far with attnx-tail --replay and its filters."""
        with tempfile.NamedTemporaryFile(prefix=self.tag, suffix=".msgpack") as f:
            f.write(self.sink.snapshot())
            f.flush()
            out = subprocess.run([self.build + "/tail/attnx-tail", "--replay", f.name] + filters,
                                 capture_output=True)
        return [json.loads(x) for x in out.stdout.splitlines() if x.strip()]

    def wait_end(self, rid, timeout=30):
        t0 = time.time()
        if self.mode == "pull":
            # only `end` records are decoded while waiting: the PULL thread needs the GIL to keep up
            while True:
                if any(r.get("rid") == rid for r in self._replay(["--type", "end", "--rid", rid])):
                    recs = self._replay(["--rid", rid])
                    with self.cv:
                        self.lines = recs  # this request's records, plus hello / gap / stats
                        self.ended.add(rid)
                    return True
                if time.time() - t0 > timeout:
                    return False
                time.sleep(0.2)
        with self.cv:
            while rid not in self.ended:
                left = timeout - (time.time() - t0)
                if left <= 0:
                    return False
                self.cv.wait(left)
        return True

    def records(self, rid, timeout=30):
        """All tail records of `rid` (req, attn, end), after its `end` arrived. Raises on timeout."""
        if not self.wait_end(rid, timeout):
            raise RuntimeError("no end record for %s" % rid)
        with self.cv:
            return [r for r in self.lines if r.get("rid") == rid]

    def others(self):
        """Records without a rid (hello, gap, stats)."""
        with self.cv:
            return [r for r in self.lines if "rid" not in r]
