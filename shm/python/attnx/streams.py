"""Fork/join of the export kernels onto a side stream, inside one forward (and so inside a captured CUDA graph).

Why: each export kernel enqueued on the engine's stream sits on its critical path: the attention kernel after it
waits for it to finish, and a step's export is a chain of small kernels whose cost is mostly latency (host-mapped
loads and stores, system-scope fences), not work. On a side stream the same kernels run beside the model's own:
each one waits (an event) for the main stream's point where its inputs are ready (the layer's Q rows computed, the
step's keys written), the side stream keeps their mutual order (begin, the copies, publish), and the main stream
waits for the side stream once, at the end of the forward (the model's forward hook), so whatever the engine
enqueues after the forward (the next step, an END) is ordered after the publish. Under torch.cuda.graph capture,
an event recorded on the capturing stream and waited on by another stream pulls that stream into the capture, and
the final wait joins it back: the graph gets a side branch, no extra nodes on its main path.

Memory: a tensor the side stream reads (a layer's Q) is held here until the join, so the caching allocator cannot
hand its memory to a later allocation of the main stream while a side kernel may still read it (no record_stream
needed, also under capture).

What it does not change: the order of everything on the engine's stream, and what the kernels write (records are
the same). The step-start count of a decode step's begin kernel moves beside the step's later key writes; attnx.hf
relies on that count only for prefills, whose step start (the pre-hook's) stays on the engine's stream.

Torch-free: the stream, event and current-stream factories are passed in (torch.cuda's, or fakes in the tests).
"""


class SideStreams:
    """n_forks fork points per forward (fork(i) uses event i). make_stream() / make_event() create a stream / an
    event; current() returns the engine's stream now (torch.cuda.current_stream: the capture stream under capture).
    Streams need record(stream) on events and wait_event(event) on streams."""

    def __init__(self, n_forks, make_stream, make_event, current):
        self.n_forks = n_forks
        self._make_stream, self._make_event, self._current = make_stream, make_event, current
        self.side, self.events, self.join_event = None, None, None
        self.on, self.forked, self.held = False, False, []
        self.forks = self.joins = 0  # counters, for tests and diagnostics

    def prepare(self):
        """Create the side stream and the events (call outside capture: creation is not a stream operation, but
        there is no reason to do it inside one)."""
        if self.side is None:
            self.side = self._make_stream()
            self.events = [self._make_event() for _ in range(self.n_forks)]
            self.join_event = self._make_event()

    def begin(self, on):
        """At the start of a forward: use the side stream for its export kernels (on) or the engine's stream. A
        forward that never reached its join (an exception before the model's forward hook ran) is joined now."""
        self.join()
        if on:
            self.prepare()
        self.on = bool(on)

    def fork(self, i, keep=None):
        """The stream for an export kernel enqueued now: None (the engine's current stream) when off; else the side
        stream, made to wait for everything the engine's stream has enqueued so far. keep: a tensor the kernel
        reads, held until the join."""
        if not self.on:
            return None
        if not 0 <= i < self.n_forks:
            raise IndexError("attnx: fork point %d of %d" % (i, self.n_forks))
        ev = self.events[i]
        ev.record(self._current())
        self.side.wait_event(ev)
        self.forked = True
        self.forks += 1
        if keep is not None:
            self.held.append(keep)
        return self.side

    def end(self):
        """At the end of a forward: join, and fork no more until the next begin (a forward that reaches the export
        calls without passing the pre-hook, e.g. the inner model called directly, then runs in line and cannot leave
        side work unjoined)."""
        joined = self.join()
        self.on = False
        return joined

    def join(self):
        """At the end of a forward: the engine's stream waits for the side stream's kernels; held tensors are
        released (their memory may be reused by work ordered after the join)."""
        if not self.forked:
            return False
        self.join_event.record(self.side)
        self._current().wait_event(self.join_event)
        self.forked = False
        self.joins += 1
        del self.held[:]
        return True
