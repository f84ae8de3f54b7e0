"""A reference pacer for the rate-limit rows of ``goodput``: what any client could get here.

One thread, raw keep-alive sockets, a busy-wait clock and no retries: it sends a status GET
every ``1 / pace`` seconds exactly (to within the microseconds a spin loop takes), reading the
answers between sends. No asyncio client can place its requests more evenly, so its share of
429s under a given bucket is the floor that the loopback, the kernel and the emulator's event
loop set on this machine, whatever the client does.
"""

from __future__ import annotations

import selectors
import socket
import time
from urllib.parse import urlsplit

CONNECTIONS = 64


def _complete(buffer: bytes) -> tuple[int, int] | None:
    """``(status, length of the whole answer)`` once ``buffer`` holds one answer."""
    head_end = buffer.find(b"\r\n\r\n")
    if head_end < 0:
        return None
    lines = buffer[:head_end].decode("latin-1").split("\r\n")
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
    total = head_end + 4 + length
    return (int(lines[0].split()[1]), total) if len(buffer) >= total else None


def pace(url: str, api_key: str, path: str, per_second: float, seconds: float) -> int:
    """Send ``GET path`` at exactly ``per_second`` for ``seconds``; returns how many sends
    were skipped.

    A send that finds all :data:`CONNECTIONS` busy is skipped, so the pace never bunches up
    to catch up."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    request = (
        f"GET {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nAuthorization: Bearer {api_key}\r\n\r\n"
    ).encode()
    selector = selectors.DefaultSelector()
    free: list[socket.socket] = []
    buffers: dict[socket.socket, bytes] = {}
    try:
        for _ in range(CONNECTIONS):
            sock = socket.create_connection((host, port))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ, sock)
            free.append(sock)
            buffers[sock] = b""
        gap = 1.0 / per_second
        start = time.perf_counter()
        due, end, skipped = start, start + seconds, 0
        while (now := time.perf_counter()) < end:
            if now >= due:
                if free:
                    free.pop().sendall(request)
                else:
                    skipped += 1
                due += gap
                continue
            for key, _ in selector.select(0):
                sock = key.data
                buffers[sock] += sock.recv(1 << 16)
                done = _complete(buffers[sock])
                if done is not None:
                    buffers[sock] = buffers[sock][done[1] :]
                    free.append(sock)
        return skipped
    finally:
        for sock in buffers:
            selector.unregister(sock)
            sock.close()
        selector.close()
