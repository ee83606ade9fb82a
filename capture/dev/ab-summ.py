#!/usr/bin/env python3
"""ab-summ.py — medians over the rounds of ab-mix.sh's lines: per shape and mode, e2e / kernel µs of each config
and each one's ratio to the first config's e2e.   usage: capture/dev/ab-summ.py ab.txt"""
import sys, statistics
rows, order = {}, []
for ln in open(sys.argv[1]):
    f = ln.split()
    if len(f) < 7 or f[0] != 'ab':
        continue
    name, shape, mode = f[2], f[3], f[4]
    if name not in order:
        order.append(name)
    rows.setdefault((shape, mode), {}).setdefault(name, []).append((float(f[5]), float(f[6])))
print('%-8s %-10s ' % ('shape', 'mode') + ' '.join('%21s' % n for n in order))
for (shape, mode), d in rows.items():
    base = statistics.median(e for e, _ in d[order[0]]) if order[0] in d else None
    cells = []
    for n in order:
        if n not in d:
            cells.append('%21s' % '-')
            continue
        e = statistics.median(x for x, _ in d[n]); k = statistics.median(y for _, y in d[n])
        cells.append('%6.1f/%6.1f %6.3f' % (e, k, e / base if base else 0))
    print('%-8s %-10s ' % (shape, mode) + ' '.join(cells) + '   (n=%d)' % len(d[order[0]]))
