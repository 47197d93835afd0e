#!/usr/bin/env python3
"""Times the first touch of fresh anonymous memory: one byte written per 4 KiB page of a new
mapping of GIB gibibytes (default 1), so the kernel (and, in a VM, the host) must supply and
zero every page. Run it twice: on a VM whose guest memory was never touched since boot, the
first run of a size the guest has not used yet is several times slower than the next.

Usage: scripts/first-touch.py [GIB]
"""
import mmap
import sys
import time

gib = float(sys.argv[1]) if len(sys.argv) > 1 else 1.0
n = int(gib * (1 << 30))
m = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
t = time.perf_counter()
for i in range(0, n, 4096):
    m[i] = 1
e = time.perf_counter() - t
print(f"first touch of {gib:g} GiB: {e:.2f} s, {n / e / 1e9:.2f} GB/s")
