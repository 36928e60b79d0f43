"""The few SMTP client steps the asyncio load scripts share: read one
reply's code, send one command."""

import asyncio

REPLY = 60.0
"""Seconds to wait for a reply by default."""


async def reply(reader, timeout=REPLY):
    """One reply's code (its last line); 0 for EOF, -1 for no reply."""
    try:
        while True:
            line = await asyncio.wait_for(reader.readline(), timeout)
            if not line:
                return 0
            if len(line) >= 4 and line[3:4] != b"-":
                return int(line[:3])
    except asyncio.TimeoutError:
        return -1
    except (OSError, ValueError):
        return 0


async def cmd(reader, writer, line):
    """Sends `line` with CRLF; the reply's code as `reply` gives it."""
    try:
        writer.write(line.encode() + b"\r\n")
        await writer.drain()
    except OSError:
        return 0
    return await reply(reader)
