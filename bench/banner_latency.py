#!/usr/bin/env python3
"""Connect-to-banner latency of several SMTP endpoints, interleaved so that
each sees the same machine noise: N rounds, each connecting once to every
LABEL=HOST:PORT in turn, timing connect() to the end of the 220 greeting,
then QUIT. Prints one line per endpoint: label, p50 and p99 in µs."""
import socket
import sys
import time


def sample(host, port):
    t0 = time.perf_counter()
    s = socket.create_connection((host, port), timeout=10)
    buf = b""
    while not buf.endswith(b"\r\n") or buf.split(b"\r\n")[-2][3:4] == b"-":
        chunk = s.recv(4096)
        if not chunk:
            break
        buf += chunk
    took = (time.perf_counter() - t0) * 1e6
    if not buf.startswith(b"220"):
        sys.exit(f"{host}:{port} greeted with {buf[:60]!r}")
    s.sendall(b"QUIT\r\n")
    s.recv(4096)
    s.close()
    return took


n = int(sys.argv[1])
targets = []
for arg in sys.argv[2:]:
    label, addr = arg.split("=", 1)
    host, port = addr.rsplit(":", 1)
    targets.append((label, host, int(port), []))
for _ in range(n):
    for label, host, port, samples in targets:
        samples.append(sample(host, port))
for label, _, _, samples in targets:
    samples.sort()
    p50 = samples[len(samples) // 2]
    p99 = samples[min(len(samples) - 1, len(samples) * 99 // 100)]
    print(f"{label:<22} {p50:10.0f} {p99:10.0f}")
