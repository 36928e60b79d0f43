#!/usr/bin/env python3
"""The loads of bench/auth.sh against one SMTP server, printed as
`load rate peak_rss_mb result` lines.

    auth_load.py PORT ROOT_PIDS USERS PASSWORD LOAD [N]

LOAD is one of
  auth-wrong / auth-right   300 (N) AUTH PLAIN at once, each on its own
                            connection from its own 127.0.1.x address,
                            user devNNN; every connection is opened and
                            greeted first, then all AUTH go out together
  sessions-auth / sessions-anon
                            N one-message sessions, 16 at a time (EHLO,
                            AUTH as devNNN or not, MAIL, RCPT, DATA, QUIT)
  guess                     one client sends wrong passwords until it is
                            cut off (at most N); prints how many were 535

ROOT_PIDS: comma-separated process ids; the resident memory of them and
all their descendants is sampled every 20 ms and its peak reported.
Every wait is bounded (REPLY seconds per reply, LIMIT per load).
"""
import asyncio
import base64
import os
import sys
import threading
import time

REPLY = 60.0
LIMIT = 300.0


def rss_kib(roots):
    """Resident KiB of `roots` and their descendants."""
    children = {}
    rss = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/status") as f:
                ppid, kib = None, 0
                for line in f:
                    if line.startswith("PPid:"):
                        ppid = int(line.split()[1])
                    elif line.startswith("VmRSS:"):
                        kib = int(line.split()[1])
        except OSError:
            continue
        children.setdefault(ppid, []).append(int(pid))
        rss[int(pid)] = kib
    total, todo, seen = 0, list(roots), set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        total += rss.get(p, 0)
        todo.extend(children.get(p, []))
    return total


class Sampler(threading.Thread):
    def __init__(self, roots):
        super().__init__(daemon=True)
        self.roots, self.peak, self.stop = roots, 0, threading.Event()

    def run(self):
        while not self.stop.is_set():
            self.peak = max(self.peak, rss_kib(self.roots))
            self.stop.wait(0.02)


async def reply(reader):
    """One reply's code (its last line)."""
    while True:
        line = await asyncio.wait_for(reader.readline(), REPLY)
        if not line:
            return 0
        if len(line) >= 4 and line[3:4] != b"-":
            return int(line[:3])


async def cmd(reader, writer, line):
    writer.write(line.encode() + b"\r\n")
    await writer.drain()
    return await reply(reader)


def plain(user, password):
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


async def greeted(port, source):
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0)), REPLY
    )
    assert await reply(reader) == 220
    assert await cmd(reader, writer, "EHLO bench.test") == 250
    return reader, writer


async def burst(port, users, password, n):
    conns = await asyncio.gather(
        *(greeted(port, f"127.0.{1 + i // 250}.{1 + i % 250}") for i in range(n))
    )
    start = time.monotonic()
    codes = await asyncio.gather(
        *(
            cmd(r, w, f"AUTH PLAIN {plain(users[i % len(users)], password)}")
            for i, (r, w) in enumerate(conns)
        )
    )
    took = time.monotonic() - start
    for r, w in conns:
        w.close()
    summary = " ".join(f"{c}x{codes.count(c)}" for c in sorted(set(codes)))
    return n / took, summary


async def sessions(port, users, password, n, authenticated):
    done, codes, next_i = 0, {}, 0

    async def one(i):
        r, w = await greeted(port, f"127.0.3.{1 + i % 16}")
        try:
            if authenticated:
                c = await cmd(r, w, f"AUTH PLAIN {plain(users[i % len(users)], password)}")
                if c != 235:
                    return c
            for line, want in (
                ("MAIL FROM:<bench@example.test>", 250),
                ("RCPT TO:<rcpt@example.test>", 250),
                ("DATA", 354),
            ):
                c = await cmd(r, w, line)
                if c != want:
                    return c
            w.write(b"Subject: bench\r\n\r\n" + b"x" * 1000 + b"\r\n.\r\n")
            c = await reply(r)
            await cmd(r, w, "QUIT")
            return c
        finally:
            w.close()

    async def runner():
        nonlocal done, next_i
        while next_i < n:
            i = next_i
            next_i += 1
            c = await one(i)
            codes[c] = codes.get(c, 0) + 1
            done += 1

    start = time.monotonic()
    await asyncio.gather(*(runner() for _ in range(16)))
    took = time.monotonic() - start
    summary = " ".join(f"{c}x{k}" for c, k in sorted(codes.items()))
    return n / took, summary


async def guess(port, users, n):
    refused = 0
    start = time.monotonic()
    for i in range(n):
        r, w = await greeted(port, "127.0.4.1")
        c = await cmd(r, w, f"AUTH PLAIN {plain(users[0], f'guess-{i}')}")
        w.close()
        if c != 535:
            return refused / max(time.monotonic() - start, 1e-6), f"{refused}x535 then {c}"
        refused += 1
    return refused / (time.monotonic() - start), f"{refused}x535, never cut off"


def main():
    port, roots, users, password, load = sys.argv[1:6]
    n = int(sys.argv[6]) if len(sys.argv) > 6 else 300
    port, roots = int(port), [int(p) for p in roots.split(",") if p]
    users = users.split(",")
    sampler = Sampler(roots)
    sampler.start()
    if load in ("auth-wrong", "auth-right"):
        pw = password if load == "auth-right" else "not-" + password
        work = burst(port, users, pw, n)
    elif load in ("sessions-auth", "sessions-anon"):
        work = sessions(port, users, password, n, load == "sessions-auth")
    elif load == "guess":
        work = guess(port, users, n)
    else:
        sys.exit(f"unknown load {load}")
    rate, summary = asyncio.run(asyncio.wait_for(work, LIMIT))
    sampler.stop.set()
    sampler.join()
    print(f"{load} {rate:.0f} {sampler.peak / 1024:.0f} {summary.replace(' ', ',')}")


if __name__ == "__main__":
    main()
