#!/usr/bin/env python3
"""Resident memory of one Ferry worker per idle SMTP session.

Starts `ferry worker` (this tree's release build by default) with one
anonymous connector on loopback, opens N sessions straight to it, each
greeted (220 read, EHLO answered; with --starttls also STARTTLS, the TLS
handshake and EHLO again), then silent, and prints the worker's VmRSS
before, with the sessions idle, and after they close:

    cargo build --release && python3 bench/worker_idle.py -n 4500
    python3 bench/worker_idle.py -n 4500 --starttls
    python3 bench/worker_idle.py --ferry ../old/target/release/ferry   # another build

Each session is one open file on both sides: mind `ulimit -n`.
"""
import argparse
import asyncio
import os
import socket
import ssl
import subprocess
import sys
import tempfile
import time

from procfs import vm


def vm_rss(pid):
    return vm(pid, "VmRSS")

CONFIG = """
[[connectors]]
name = "Idle"
port = {port}
remote_ranges = ["127.0.0.0/8"]
permissions = ["anonymous"]
auth = ["tls"]
tls = {{ certificate = "certs/idle.crt", key = "certs/idle.key" }}
limits = {{ max_connections = {cap}, max_connections_per_source = {cap} }}
"""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def reply(reader):
    for _ in range(100):
        line = await reader.readline()
        if not line:
            raise ConnectionError("closed by the worker")
        if line[3:4] != b"-":
            return line
    raise ConnectionError("reply too long")


async def session(port, starttls, ctx, held, gate):
    async with gate:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for send, want in [(None, b"220"), (b"EHLO idle.test\r\n", b"250")] + (
            [(b"STARTTLS\r\n", b"220"), ("tls", None), (b"EHLO idle.test\r\n", b"250")]
            if starttls
            else []
        ):
            if send == "tls":
                await writer.start_tls(ctx)
                continue
            if send:
                writer.write(send)
            got = await asyncio.wait_for(reply(reader), 30)
            if not got.startswith(want):
                raise RuntimeError(f"expected {want!r}, got {got!r}")
        held.append(writer)


async def measure(pid, port, n, starttls, settle):
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    before = vm_rss(pid)
    held = []
    started = time.time()
    gate = asyncio.Semaphore(200)
    await asyncio.gather(*(session(port, starttls, ctx, held, gate) for _ in range(n)))
    took = time.time() - started
    await asyncio.sleep(settle)
    idle = vm_rss(pid)
    print(
        f"{n} idle sessions{' after STARTTLS' if starttls else ''}: "
        f"VmRSS {before} KiB before, {idle} KiB idle, "
        f"{(idle - before) * 1024 / n:.0f} bytes per session "
        f"(opened in {took:.1f} s)",
        flush=True,
    )
    for w in held:
        w.close()
    await asyncio.sleep(settle)
    print(f"after they closed: VmRSS {vm_rss(pid)} KiB", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-n", type=int, default=2000, help="idle sessions (default 2000)")
    p.add_argument("--starttls", action="store_true", help="STARTTLS before going idle")
    p.add_argument("--ferry", default="target/release/ferry", help="the ferry binary")
    p.add_argument("--settle", type=float, default=3.0, help="seconds before reading VmRSS")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as work:
        ca, certs = os.path.join(work, "ca"), os.path.join(work, "certs")
        quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
        subprocess.run([a.ferry, "cert", "init", ca], check=True, **quiet)
        subprocess.run(
            [a.ferry, "cert", "issue", "--ca", ca, "--role", "control",
             "--host", "localhost", "--out", certs, "idle"],
            check=True, **quiet,
        )
        port = free_port()
        with open(os.path.join(work, "ferry.toml"), "w") as f:
            f.write(CONFIG.format(port=port, cap=a.n + 100))
        out = open(os.path.join(work, "out"), "w+")
        worker = subprocess.Popen(
            [a.ferry, "worker", "--config", os.path.join(work, "ferry.toml"),
             "--listen", "127.0.0.1", "--data", os.path.join(work, "data"),
             "--admin", "127.0.0.1:0", "--hostname", "idle.test"],
            stdout=out, stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.time() + 30
            while time.time() < deadline:
                out.seek(0)
                if "worker ready" in out.read():
                    break
                if worker.poll() is not None:
                    sys.exit("the worker exited before it was ready")
                time.sleep(0.1)
            else:
                sys.exit("the worker was not ready within 30 s")
            time.sleep(a.settle)
            asyncio.run(measure(worker.pid, port, a.n, a.starttls, a.settle))
        finally:
            worker.kill()
            worker.wait()


if __name__ == "__main__":
    main()
