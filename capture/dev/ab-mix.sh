#!/bin/bash
# ab-mix.sh — rotated A/B rounds of attn_cuda_test --bench (AX_BENCH_BRIEF=1) on a GPU machine.
# usage: capture/dev/ab-mix.sh ROUNDS SHAPES CONFIG...   CONFIG = name=bin.xz[:VAR=value[:VAR=value...]]
#   e.g. capture/dev/ab-mix.sh 5 1x4K,1x128K base=.ab/base.xz new=.ab/new.xz nograph=.ab/new.xz:AX_FAST_GRAPH=0
# Each round runs every config once, in an order rotated by the round (so no config always runs first); lines
# go to $OUT/ab.txt prefixed "ab <round> <name>"; capture/dev/ab-summ.py takes medians over the rounds.
set -uo pipefail
rounds=$1 shapes=$2; shift 2
out=${OUT:-.}/ab.txt
dir=$(mktemp -d)
names=() bins=() envs=()
for c in "$@"; do
	name=${c%%=*} rest=${c#*=}
	bin=${rest%%:*} env=""
	[ "$rest" != "$bin" ] && env=${rest#*:}
	[ -x "$dir/$(basename "$bin" .xz)" ] || xz -dc "$bin" >"$dir/$(basename "$bin" .xz)" && chmod +x "$dir/$(basename "$bin" .xz)"
	names+=("$name") bins+=("$dir/$(basename "$bin" .xz)") envs+=("${env//:/ }")
done
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader | sed 's/^/# /' >>"$out"
n=${#names[@]}
for ((r = 0; r < rounds; r++)); do
	for ((j = 0; j < n; j++)); do
		i=$(((j + r) % n))
		# shellcheck disable=SC2086
		env ${envs[$i]} AX_BENCH_BRIEF=1 AX_BENCH_SHAPES="$shapes" "${bins[$i]}" --bench 2>&1 |
			grep -E '^[0-9]+x[0-9]+[KM] ' | sed "s/^/ab $r ${names[$i]} /" >>"$out"
	done
done
