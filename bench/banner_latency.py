#!/usr/bin/env python3
"""Connect-to-banner latency: opens N connections one after another to
HOST:PORT, times each from connect() to the end of the 220 greeting, sends
QUIT, and prints p50 and p99 in microseconds."""
import socket
import sys
import time

host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
samples = []
for _ in range(n):
    t0 = time.perf_counter()
    s = socket.create_connection((host, port), timeout=10)
    buf = b""
    while not buf.endswith(b"\r\n") or buf.split(b"\r\n")[-2][3:4] == b"-":
        chunk = s.recv(4096)
        if not chunk:
            break
        buf += chunk
    samples.append((time.perf_counter() - t0) * 1e6)
    if not buf.startswith(b"220"):
        sys.exit(f"{host}:{port} greeted with {buf[:60]!r}")
    s.sendall(b"QUIT\r\n")
    s.recv(4096)
    s.close()
samples.sort()
print(f"{samples[len(samples) // 2]:.0f} {samples[min(len(samples) - 1, len(samples) * 99 // 100)]:.0f}")
