#!/usr/bin/env bash
# cuda_recover_daemon.sh — attnx-capture-emul (the daemon's CUDA path on the emulated device) survives a sticky
# CUDA error in the middle of a run, both ways capture/README.md ("Sticky CUDA errors") describes.
#
# 1. The reset recovers (in-process): the GPU test engine (gpu_engine_emul, plain scenario) runs with the
#    emulator's 10th batch faulting for good (AX_EMUL_STICKY_AT_RUN). The harness itself then reports a mismatch
#    (it demands identical record sets; the failed batch's rows are gaps), so this script checks the recovery from
#    the logs and counts instead:
#    - the backend classified the error as sticky and reset the device once, with nothing left open (emulator);
#    - the capture attached afresh (two attaches to the device segment) and read only imported memory afterwards;
#    - it went on capturing: at least 20 good batches after the reset (the run has about 70; without the recovery
#      every batch after the fault fails). Results after the re-import are checked exactly by cuda_recover_test.
#    The harness waits up to 60 s when the fault hit a request's last step: the capture reports that request with
#    a `gap requests cuda_reset` and, having forgotten it, drops its `end` (capture.c's restart path).
# 2. The reset never recovers and the first re-executed image still finds the device unusable
#    (AX_EMUL_OPEN_FAILS_IN_IMAGE=1): the harness's `sticky` scenario must pass (it checks the records itself) with
#    two re-execs, and the log must show the probe failing in image 1 and image 2 starting. (The plain re-exec,
#    once, is the cudaimp tests capture_emul_*_sticky.)
# Usage: cuda_recover_daemon.sh GPU_ENGINE_EMUL CAPTURE_EMUL CAPTURE
set -u
[ $# -eq 3 ] || { echo "usage: $0 GPU_ENGINE_EMUL CAPTURE_EMUL CAPTURE" >&2; exit 2; }
log=$(mktemp /tmp/attnx-sticky.XXXXXX)
log2=$(mktemp /tmp/attnx-sticky2.XXXXXX)
trap 'rm -f "$log" "$log2"' EXIT
AX_EMUL_STICKY_AT_RUN=10 "$1" "$2" "$3" mean_logit plain >"$log" 2>&1
AX_EMUL_OPEN_FAILS_IN_IMAGE=1 "$1" "$2" "$3" mean_logit sticky >"$log2" 2>&1
rc2=$?
fail=0
check() { # description, command...
	local what=$1; shift
	if "$@"; then echo "ok   $what"; else echo "FAIL $what"; fail=1; fi
}
echo "# 1. in-process reset"
check "sticky error seen and device reset" grep -q "device 0 reset (reset 1)" "$log"
check "one reset, nothing open at it, no job outside imported memory" \
	grep -Eq "capture_emul: [0-9]+ runs, .* 0 jobs outside the imported memory, 1 device resets, 0 with something still open" "$log"
attaches=$(grep -Ec "attached to /attnx\.gputest\.[0-9]+\.dev:" "$log")
check "attached afresh after the reset ($attaches attaches)" test "$attaches" -eq 2
good=$(grep -Eo "[0-9]+ good runs since the last reset" "$log" | head -1 | cut -d" " -f1)
check "went on capturing after the reset (${good:-?} good batches)" test "${good:-0}" -ge 20
check "no re-exec when the reset recovers" test "$(grep -c "re-executing" "$log")" -eq 0
echo "# 2. re-exec, device still unusable in the first new image"
check "harness: sticky scenario passed (rc $rc2)" test "$rc2" -eq 0
check "image 1 found the device unusable twice" test "$(grep -c "device 0 not usable after the re-exec" "$log2")" -eq 2
check "image 2 started" grep -q "restarted after a sticky CUDA error (2)" "$log2"
if [ $fail -ne 0 ]; then
	echo "---- log 1"; cat "$log"
	echo "---- log 2"; cat "$log2"
fi
exit $fail
