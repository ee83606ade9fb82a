#!/usr/bin/env python3
"""attnx.streams.SideStreams (the export kernels' side stream, forked per layer and joined at the forward's end) with
fake streams and events that log what would be enqueued: standard library only (CI's python3).

Cases, each a forward as attnx.hf drives it (begin at the pre-hook, forks at the export calls, join at the forward
hook), checked against the exact sequence of stream operations it must produce:
  * off: fork returns None (the engine's stream), nothing is recorded or waited, join is a no-op;
  * on: each fork records its own event on the engine's current stream and makes the side stream wait for it,
    before the export kernel is enqueued; the join records one event on the side stream and the engine's stream
    waits for it; the stream and events are created once (prepare), not per forward;
  * held tensors live exactly until the join;
  * a forward that never reached its join (an exception) is joined by the next begin, before anything else;
  * the current stream is looked up at every fork and join (under graph capture it is the capture stream);
  * a fork point out of range raises (a caller bug, caught by attnx.hf's export guard);
  * on then off: the second forward enqueues nothing on the side stream;
  * end (the forward hook's): joins, and forks no more until the next begin.
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from attnx.streams import SideStreams  # noqa: E402

log = []


class FakeStream:
    def __init__(self, name):
        self.name = name

    def wait_event(self, ev):
        log.append(("wait", self.name, ev.name))


class FakeEvent:
    n = 0

    def __init__(self):
        FakeEvent.n += 1
        self.name = "e%d" % FakeEvent.n

    def record(self, stream):
        log.append(("record", self.name, stream.name))


made = []


def make_stream():
    made.append("side")
    return FakeStream("side")


current = [FakeStream("main")]


def new():
    FakeEvent.n = 0
    del made[:]
    return SideStreams(3, make_stream, FakeEvent, lambda: current[0])


def expect(cond, msg):
    if not cond:
        raise AssertionError(msg)


def case_off():
    del log[:]
    s = new()
    s.begin(False)
    expect(s.fork(0, "q0") is None and s.fork(2) is None, "off: forks give the engine's stream")
    expect(not s.join(), "off: nothing to join")
    expect(log == [] and made == [] and s.held == [], "off: nothing enqueued or created: %s %s" % (log, made))


def case_on():
    del log[:]
    s = new()
    s.begin(True)
    expect(made == ["side"], "on: the side stream is created at the first begin")
    a = s.fork(0, "q0")
    b = s.fork(1, "q1")
    expect(a is s.side and b is s.side, "on: forks give the side stream")
    expect(s.held == ["q0", "q1"], "held until the join: %s" % s.held)
    expect(s.join() and s.held == [], "join releases the held tensors")
    want = [("record", "e1", "main"), ("wait", "side", "e1"), ("record", "e2", "main"), ("wait", "side", "e2"),
            ("record", "e4", "side"), ("wait", "main", "e4")]
    expect(log == want, "on: %s" % log)
    del log[:]
    s.begin(True)
    s.fork(2)
    s.join()
    expect(made == ["side"] and FakeEvent.n == 4, "stream and events made once (%s, %d events)" % (made, FakeEvent.n))
    expect(log == [("record", "e3", "main"), ("wait", "side", "e3"), ("record", "e4", "side"),
                   ("wait", "main", "e4")], "second forward: %s" % log)
    expect(s.forks == 3 and s.joins == 2, "counters %d forks %d joins" % (s.forks, s.joins))


def case_unjoined():
    del log[:]
    s = new()
    s.begin(True)
    s.fork(0, "q0")
    del log[:]
    s.begin(True)  # the previous forward raised before its join
    expect(log == [("record", "e4", "side"), ("wait", "main", "e4")] and s.held == [],
           "begin joins a forward left open first: %s" % log)


def case_capture_stream():
    del log[:]
    s = new()
    s.begin(True)
    current[0] = FakeStream("capture")
    try:
        s.fork(1)
        s.join()
    finally:
        current[0] = FakeStream("main")
    expect(log == [("record", "e2", "capture"), ("wait", "side", "e2"), ("record", "e4", "side"),
                   ("wait", "capture", "e4")], "the current stream at each call: %s" % log)


def case_range():
    s = new()
    s.begin(True)
    for i in (-1, 3):
        try:
            s.fork(i)
        except IndexError:
            continue
        raise AssertionError("fork(%d) of 3 accepted" % i)


def case_on_off():
    del log[:]
    s = new()
    s.begin(True)
    s.fork(0)
    s.join()
    del log[:]
    s.begin(False)
    expect(s.fork(0) is None and not s.join() and log == [], "off after on: %s" % log)


def case_end():
    del log[:]
    s = new()
    s.begin(True)
    s.fork(0, "q0")
    expect(s.end() and s.held == [], "end joins")
    del log[:]
    expect(s.fork(1) is None and log == [] and not s.end(), "after end: in line until the next begin: %s" % log)
    s.begin(True)
    expect(s.fork(1) is s.side, "the next begin forks again")


CASES = [case_off, case_on, case_unjoined, case_capture_stream, case_range, case_on_off, case_end]


def main():
    print("1..%d" % len(CASES))
    bad = 0
    for i, c in enumerate(CASES, 1):
        try:
            c()
            print("ok %d - %s" % (i, c.__name__))
        except AssertionError as e:
            bad += 1
            print("not ok %d - %s: %s" % (i, c.__name__, e))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
