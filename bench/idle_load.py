#!/usr/bin/env python3
"""The loads of bench/idle.sh against one SMTP endpoint. Every wait is
bounded (REPLY seconds per reply, LIMIT per load); a load prints key=value
lines the script turns into its table.

    idle_load.py idle HOST:PORT N NAME=PID,... [--after S]
        Opens N sessions (at most 64 connecting at once, so the listener's
        backlog is not what is measured) and waits for each one's 220,
        then holds them silent. Reads VmRSS of each NAME=PID before the
        first connect, once all are greeted (after 3 s of quiet), then
        closes every session and reads it again S seconds later (30).
        Prints `greeted=G of=N seconds=T`, then `rss STAGE NAME KIB` lines.

    idle_load.py burst HOST:PORT N [SOURCE]
        Opens N connections at once (from SOURCE, an address on loopback) and times each from the start of the
        burst to the end of its 220; holds them until all are greeted or
        BURST_LIMIT (30 s) has passed, then closes them. Prints
        `greeted= late1= late10= never= p50= p99= max=` (milliseconds;
        late1/late10: not greeted within 1 s / 10 s; never: not at all;
        outcomes: the first reply's code, or EOF, per connection).

    idle_load.py data HOST:PORT SESSIONS BYTES PIDS
        SESSIONS sessions at once, each EHLO, MAIL FROM with SIZE, one
        RCPT, DATA with a BYTES-long message sent in 64 KiB writes, QUIT.
        PIDS (comma-separated) are the server's root processes: the summed
        PSS of them and their descendants is sampled for its peak. Prints
        `ok= total= seconds= mb_per_s= peak_pss_kib= codes=` (ok counts
        250 after the final dot; seconds from the first connect to the last
        reply; codes counts every outcome, e.g. `250x28,452x2`).
"""
import asyncio
import os
import resource
import select
import socket
import sys
import threading
import time

from smtpio import cmd, reply
from procfs import pss_kib, vm

REPLY = 60.0
LIMIT = 600.0
BURST_LIMIT = 30.0
CONNECTING = 64


def raise_nofile():
    """Soft open-files limit up to the hard one (N sessions need N fds)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


class Sampler(threading.Thread):
    """Samples the tree's PSS until stopped, pausing at least four times
    a sample's cost between samples (20 ms at least)."""

    def __init__(self, roots):
        super().__init__(daemon=True)
        self.roots, self.peak, self.stop = roots, 0, threading.Event()

    def run(self):
        while not self.stop.is_set():
            t = time.monotonic()
            self.peak = max(self.peak, pss_kib(self.roots))
            self.stop.wait(max(0.02, 4 * (time.monotonic() - t)))


def endpoint(arg):
    host, port = arg.rsplit(":", 1)
    return host, int(port)


def close_all(writers):
    for w in writers:
        try:
            w.close()
        except OSError:
            pass


async def idle(host, port, n, pids, after):
    limit = asyncio.Semaphore(CONNECTING)
    writers, failed = [], {}

    async def one():
        async with limit:
            try:
                r, w = await asyncio.wait_for(asyncio.open_connection(host, port), REPLY)
            except (OSError, asyncio.TimeoutError):
                failed["connect"] = failed.get("connect", 0) + 1
                return
            code = await reply(r)
            if code == 220:
                writers.append(w)
            else:
                failed[str(code)] = failed.get(str(code), 0) + 1
                w.close()

    for name, pid in pids:
        print(f"rss before {name} {vm(pid, 'VmRSS')}")
    t0 = time.monotonic()
    await asyncio.wait_for(asyncio.gather(*(one() for _ in range(n))), LIMIT)
    took = time.monotonic() - t0
    print(f"greeted={len(writers)} of={n} seconds={took:.1f} failed={failed or '-'}")
    # The servers settle (a session's last allocations, the balancer's
    # handoff) before the reading.
    await asyncio.sleep(3)
    for name, pid in pids:
        print(f"rss open {name} {vm(pid, 'VmRSS')}")
    close_all(writers)
    await asyncio.sleep(after)
    for name, pid in pids:
        print(f"rss after {name} {vm(pid, 'VmRSS')}")


def burst(host, port, n, source):
    """Plain non-blocking sockets and epoll rather than asyncio: all N
    connects are issued within milliseconds and each 220 is timed when the
    kernel says it is readable, so the client's own overhead stays small
    next to what is measured (SYNs dropped on a full backlog cost 1 s)."""
    ep = select.epoll()
    socks, greeted, buf, outcomes = {}, [], {}, {}
    t0 = time.monotonic()
    for _ in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        s.bind((source, 0))
        s.connect_ex((host, port))
        socks[s.fileno()] = s
        buf[s.fileno()] = b""
        ep.register(s.fileno(), select.EPOLLIN)
    deadline = t0 + BURST_LIMIT
    pending = n
    while pending > 0 and time.monotonic() < deadline:
        for fd, _ in ep.poll(max(0.0, deadline - time.monotonic())):
            try:
                chunk = socks[fd].recv(4096)
            except OSError:
                chunk = b""
            buf[fd] += chunk
            if not chunk or len(buf[fd]) >= 3:
                ep.unregister(fd)
                pending -= 1
                got = buf[fd][:3].decode(errors="replace") if chunk else "EOF"
                outcomes[got] = outcomes.get(got, 0) + 1
                if got == "220":
                    greeted.append(time.monotonic() - t0)
    for s in socks.values():
        s.close()
    ep.close()
    greeted.sort()
    ms = [t * 1000 for t in greeted] or [0.0]
    print(
        f"greeted={len(greeted)} late1={n - sum(1 for t in greeted if t <= 1)} "
        f"late10={n - sum(1 for t in greeted if t <= 10)} never={n - len(greeted)} "
        f"p50={ms[len(ms) // 2]:.0f} p99={ms[min(len(ms) - 1, len(ms) * 99 // 100)]:.0f} "
        f"max={ms[-1]:.0f} outcomes={','.join(f'{k}x{v}' for k, v in sorted(outcomes.items())) or '-'}"
    )


def message_chunks(size, i):
    """A `size`-byte message as 64 KiB chunks: a few headers, then lines of
    76 characters (no line starts with a dot), the last one cut to fit."""
    head = (
        f"From: <load@bench.test>\r\nTo: <rcpt@sink.test>\r\n"
        f"Subject: bench {i}\r\nMessage-ID: <bench-{i}-{time.time_ns()}@bench.test>\r\n\r\n"
    ).encode()
    line = b"x" * 76 + b"\r\n"
    block = line * (65536 // len(line))
    left = size - len(head)
    yield head
    while left > len(block):
        yield block
        left -= len(block)
    lines = max(1, left // len(line))
    yield line * lines


async def data(host, port, sessions, size, roots):
    codes = {}
    ends = []

    def count(code):
        codes[code] = codes.get(code, 0) + 1

    async def one(i):
        try:
            r, w = await asyncio.wait_for(asyncio.open_connection(host, port), REPLY)
        except (OSError, asyncio.TimeoutError):
            count("connect-error")
            return
        try:
            for line, want, stage in (
                (None, 220, "greeting"),
                ("EHLO bench.test", 250, "EHLO"),
                (f"MAIL FROM:<load@bench.test> SIZE={size}", 250, "MAIL"),
                ("RCPT TO:<rcpt@sink.test>", 250, "RCPT"),
                ("DATA", 354, "DATA"),
            ):
                code = await (reply(r) if line is None else cmd(r, w, line))
                if code != want:
                    count(f"{stage}-{code}")
                    return
            try:
                for chunk in message_chunks(size, i):
                    w.write(chunk)
                    await asyncio.wait_for(w.drain(), REPLY)
                w.write(b".\r\n")
                await w.drain()
            except (OSError, asyncio.TimeoutError):
                # The server may refuse mid-message (452, 552) and close.
                pass
            code = await reply(r, 300)
            ends.append(time.monotonic())
            count(str(code))
            await cmd(r, w, "QUIT")
        finally:
            w.close()

    sampler = Sampler(roots)
    sampler.start()
    t0 = time.monotonic()
    await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(sessions))), LIMIT)
    seconds = (max(ends) if ends else time.monotonic()) - t0
    sampler.stop.set()
    sampler.join()
    ok = codes.get("250", 0)
    shown = ",".join(f"{k}x{v}" for k, v in sorted(codes.items()))
    print(
        f"ok={ok} total={sessions} seconds={seconds:.2f} "
        f"mb_per_s={ok * size / 1e6 / seconds:.1f} peak_pss_kib={sampler.peak} codes={shown}"
    )


def main():
    args = sys.argv[1:]
    if len(args) < 3:
        sys.exit(__doc__)
    raise_nofile()
    load, (host, port) = args[0], endpoint(args[1])
    if load == "idle":
        after = 30.0
        if "--after" in args:
            after = float(args[args.index("--after") + 1])
        pids = [(p.split("=")[0], int(p.split("=")[1])) for p in args[3].split(",")]
        asyncio.run(idle(host, port, int(args[2]), pids, after))
    elif load == "burst":
        source = args[3] if len(args) > 3 else "127.0.0.1"
        burst(host, port, int(args[2]), source)
    elif load == "data":
        roots = [int(p) for p in args[4].split(",")]
        asyncio.run(data(host, port, int(args[2]), int(args[3]), roots))
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
