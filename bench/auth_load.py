#!/usr/bin/env python3
"""The loads of bench/auth.sh against one SMTP server, printed as one line:

    LOAD OK TOTAL SECONDS OK_PER_S PEAK_PSS_MB CPU_MS_PER_REPLY BREAKDOWN

    auth_load.py [--rounds R] [--net 127.X] PORT ROOT_PIDS USERS PASSWORD LOAD [N]
    auth_load.py cpu ROOT_PIDS      # the tree's CPU seconds so far

LOAD is one of
  auth-wrong / auth-right   N (300) AUTH PLAIN at once, each on its own
                            connection from its own address in --net
                            (127.X.Y.Z), user devNNN; every connection is
                            opened and greeted first (not timed), then all
                            AUTH go out together and the time to the last
                            reply is taken. --rounds R repeats this R times
                            and sums the timed parts (the warm-cache load,
                            where one round takes milliseconds).
  sessions-auth / sessions-anon
                            N one-message sessions, 16 at a time, from
                            127.0.0.1 (EHLO, AUTH as devNNN or not, MAIL,
                            RCPT, DATA with 1 KiB, QUIT)
  guess                     one client (the first address in --net) sends
                            wrong passwords, one connection each, until a
                            reply other than 535 (at most N)

OK counts successes only: 535 for a wrong password (the server checked it
and said no), 235 for a right one, 250 after DATA for a session; OK_PER_S
is OK over the timed SECONDS. BREAKDOWN counts every outcome (`235x290,
454x10`; a session that failed says where: `AUTH-454`, `MAIL-EOF`; EOF is
a closed connection, `timeout` no reply within REPLY seconds).

ROOT_PIDS: comma-separated process ids. The proportional set size (PSS,
/proc/PID/smaps_rollup) of them and all their descendants is summed and
its peak over the load reported, so pages shared by 300 smtpd processes
count once in total, not 300 times. CPU_MS_PER_REPLY is the CPU time the
same process tree used during the timed part (reaped children included
through their parent's cutime/cstime) over the replies counted.
Every wait is bounded (REPLY seconds per reply, LIMIT per load).
"""
import argparse
import asyncio
import base64
import os
import sys
import threading
import time

from smtpio import cmd, reply
from procfs import tree, pss_kib

REPLY = 60.0
LIMIT = 300.0
CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(roots):
    """CPU seconds of `roots` and their descendants, reaped ones included."""
    ticks = 0
    for pid in tree(roots):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            # utime stime cutime cstime (stat fields 14-17)
            ticks += sum(int(x) for x in fields[11:15])
        except (OSError, ValueError, IndexError):
            continue
    return ticks / CLK_TCK


class Sampler(threading.Thread):
    """Samples the tree's PSS until stopped. Reading smaps_rollup of 300
    processes takes milliseconds of CPU, so the pause between samples is
    at least four times the last sample's cost (the sampler takes at most
    a fifth of one core from the server it measures), and 20 ms for a
    single process."""

    def __init__(self, roots):
        super().__init__(daemon=True)
        self.roots, self.peak, self.stop = roots, 0, threading.Event()

    def run(self):
        while not self.stop.is_set():
            t = time.monotonic()
            self.peak = max(self.peak, pss_kib(self.roots))
            self.stop.wait(max(0.02, 4 * (time.monotonic() - t)))


class Tally:
    """Outcomes, the timed seconds and the server's CPU seconds over them,
    kept outside the load so a load cut short by LIMIT still reports."""

    def __init__(self, roots, success):
        self.roots, self.success = roots, success
        self.outcomes, self.seconds, self.cpu = {}, 0.0, 0.0
        self._t = self._c = 0.0

    def start(self):
        self._c, self._t = cpu_seconds(self.roots), time.monotonic()

    def stop(self):
        self.seconds += time.monotonic() - self._t
        self.cpu += cpu_seconds(self.roots) - self._c
        self._t = 0.0

    def count(self, outcome):
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1

    def ok(self):
        return self.outcomes.get(self.success, 0)

    def total(self):
        return sum(self.outcomes.values())


def label(code):
    return {0: "EOF", -1: "timeout", -2: "connect-error"}.get(code, str(code))


def plain(user, password):
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


async def greeted(port, source):
    """An open connection past its 220 and EHLO's 250, or the failing code."""
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0)), REPLY
        )
    except (OSError, asyncio.TimeoutError):
        return None, -2
    code = await reply(reader)
    if code == 220:
        code = await cmd(reader, writer, "EHLO bench.test")
        if code == 250:
            return (reader, writer), 0
    writer.close()
    return None, code


def address(net, i):
    """The i-th client address in 127.X.0.0/16 (X from `net`)."""
    return f"{net}.{i // 250}.{1 + i % 250}"


async def burst(tally, port, net, users, password, n, rounds):
    for _ in range(rounds):
        opened = await asyncio.gather(*(greeted(port, address(net, i)) for i in range(n)))
        conns = [c for c, _ in opened if c]
        for c, code in opened:
            if not c:
                tally.count(f"greeting-{label(code)}")
        tally.start()
        codes = await asyncio.gather(
            *(
                cmd(r, w, f"AUTH PLAIN {plain(users[i % len(users)], password)}")
                for i, (r, w) in enumerate(conns)
            )
        )
        tally.stop()
        for r, w in conns:
            w.close()
        for c in codes:
            tally.count(label(c))


async def sessions(tally, port, users, password, n, authenticated):
    next_i = 0

    async def one(i):
        conn, code = await greeted(port, "127.0.0.1")
        if not conn:
            return f"greeting-{label(code)}"
        r, w = conn
        try:
            if authenticated:
                c = await cmd(r, w, f"AUTH PLAIN {plain(users[i % len(users)], password)}")
                if c != 235:
                    return f"AUTH-{label(c)}"
            for line, want in (
                ("MAIL FROM:<bench@example.test>", 250),
                ("RCPT TO:<rcpt@example.test>", 250),
                ("DATA", 354),
            ):
                c = await cmd(r, w, line)
                if c != want:
                    return f"{line[:4]}-{label(c)}"
            w.write(b"Subject: bench\r\n\r\n" + b"x" * 1000 + b"\r\n.\r\n")
            c = await reply(r)
            if c != 250:
                return f"dot-{label(c)}"
            await cmd(r, w, "QUIT")
            return "250"
        finally:
            w.close()

    async def runner():
        nonlocal next_i
        while next_i < n:
            i = next_i
            next_i += 1
            tally.count(await one(i))

    tally.start()
    try:
        await asyncio.gather(*(runner() for _ in range(16)))
    finally:
        tally.stop()


async def guess(tally, port, net, users, n):
    tally.start()
    try:
        for i in range(n):
            conn, code = await greeted(port, address(net, 0))
            if conn:
                r, w = conn
                code = await cmd(r, w, f"AUTH PLAIN {plain(users[0], f'guess-{i}')}")
                w.close()
            tally.count(label(code))
            if code != 535:
                return
    finally:
        tally.stop()


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "cpu":
        # auth_load.py cpu ROOT_PIDS: the tree's CPU seconds (for settling)
        print(f"{cpu_seconds([int(x) for x in sys.argv[2].split(',') if x]):.3f}")
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--net", default="127.1", help="client addresses 127.X.0.0/16")
    p.add_argument("port", type=int)
    p.add_argument("roots")
    p.add_argument("users")
    p.add_argument("password")
    p.add_argument("load")
    p.add_argument("n", type=int, nargs="?", default=300)
    a = p.parse_args()
    roots = [int(x) for x in a.roots.split(",") if x]
    users = a.users.split(",")
    success = {"auth-wrong": "535", "auth-right": "235", "guess": "535"}.get(a.load, "250")
    tally = Tally(roots, success)
    if a.load in ("auth-wrong", "auth-right"):
        pw = a.password if a.load == "auth-right" else "not-" + a.password
        work = burst(tally, a.port, a.net, users, pw, a.n, a.rounds)
    elif a.load in ("sessions-auth", "sessions-anon"):
        work = sessions(tally, a.port, users, a.password, a.n, a.load == "sessions-auth")
    elif a.load == "guess":
        work = guess(tally, a.port, a.net, users, a.n)
    else:
        raise SystemExit(f"unknown load {a.load}")
    sampler = Sampler(roots)
    sampler.start()
    try:
        asyncio.run(asyncio.wait_for(work, LIMIT))
    except asyncio.TimeoutError:
        if tally._t:
            tally.stop()
        tally.count("LIMIT")
    sampler.stop.set()
    sampler.join()
    breakdown = ",".join(f"{k}x{v}" for k, v in sorted(tally.outcomes.items()))
    secs = max(tally.seconds, 1e-6)
    print(
        f"{a.load} {tally.ok()} {tally.total()} {tally.seconds:.3f} {tally.ok() / secs:.0f} "
        f"{sampler.peak / 1024:.0f} {tally.cpu * 1000 / max(tally.total(), 1):.2f} {breakdown}"
    )


if __name__ == "__main__":
    main()
