"""proc_util — stdlib helpers shared by the CPU-side tests: stop a child process, read attnx-tail's JSON lines."""
import json
import signal
import subprocess


def stop(p, timeout=5):
    """SIGTERM a child (resumed first, in case a test stopped it), SIGKILL after `timeout` s; accepts None."""
    if p and p.poll() is None:
        p.send_signal(signal.SIGCONT)
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def read_records(path):
    """The records of an attnx-tail output file (one JSON object a line)."""
    out = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                out.append(json.loads(line))
    return out
