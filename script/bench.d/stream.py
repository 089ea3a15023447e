"""The event stream: the http process's resident memory before and after IDLE streams are
opened that receive nothing, then, with them still open, how soon a connected client
gets each event of COUNT POST /instances (sent one at a time, 10 ms apart): from the
event's `at` (the database clock when its transaction began, so an upper bound of the
time since it committed) to the moment the client reads it (same host, same clock).

    python3 stream.py URL TOKEN IDLE_TOKEN PID COUNT IDLE
Prints one line: p50_ms p99_ms events rss_before_mib rss_idle_mib kib_per_idle_stream."""

import asyncio
import datetime
import json
import sys
import time
from urllib.parse import urlsplit

import rawhttp

url, token, idle_token, pid, count, idle = sys.argv[1:7]
count, idle = int(count), int(idle)
parts = urlsplit(url)
host, port = parts.hostname, parts.port


def rss_kib():
    return rawhttp.rss_kib(pid)


async def open_stream(who):
    reader, writer = await asyncio.open_connection(host, port)
    head = await rawhttp.get_head(reader, writer, host, "/stream/instances", who)
    if not head.startswith(b"HTTP/1.1 200"):
        raise SystemExit(f"stream refused: {head[:200]!r}")
    return reader, writer


async def events(reader):
    """Yields (data, time read) for each `instance` event (chunked framing skipped)."""
    buffer = b""
    while True:
        chunk = await reader.read(65536)
        if not chunk:
            return
        now = time.time()
        buffer += chunk
        for line in buffer.split(b"\n")[:-1]:
            if line.startswith(b"data: "):
                yield json.loads(line[6:]), now
        buffer = buffer.rsplit(b"\n", 1)[-1]


async def post_all():
    reader, writer = await asyncio.open_connection(host, port)
    body = json.dumps({"provider": "fake", "image": "stream-bench"}).encode()
    for _ in range(count):
        writer.write(
            (
                f"POST /instances HTTP/1.1\r\nHost: {host}\r\nAuthorization: token {token}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
            ).encode()
            + body
        )
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(
            next(
                line.split(b":", 1)[1]
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
        )
        await reader.readexactly(length)
        await asyncio.sleep(0.01)
    writer.close()


async def main():
    before = rss_kib()
    idle_streams = []
    for _ in range(idle):
        idle_streams.append(await open_stream(idle_token))
    await asyncio.sleep(1)
    with_idle = rss_kib()

    watcher, _ = await open_stream(token)
    latencies = []

    async def watch():
        async for data, read_at in events(watcher):
            if data["event"]["to_state"] != "creating":
                continue
            written = datetime.datetime.fromisoformat(data["event"]["at"]).timestamp()
            latencies.append((read_at - written) * 1000)
            if len(latencies) == count:
                return

    watching = asyncio.create_task(watch())
    await post_all()
    await asyncio.wait_for(watching, 60)
    latencies.sort()
    p50 = latencies[len(latencies) // 2]
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    per_stream = (with_idle - before) / idle
    print(
        f"{p50:.1f} {p99:.1f} {len(latencies)} {before / 1024:.1f} {with_idle / 1024:.1f} "
        f"{per_stream:.0f}"
    )
    for _, writer in idle_streams:
        writer.close()


asyncio.run(main())
