"""Wrong-secret storm against one token id, while a client with a valid, cached token keeps
working: the valid client's latency before and during the storm, the storm's answers, and
the http process's resident memory.

    python3 guesses.py URL VALID_TOKEN WRONG_ID COUNT SPREAD PID
SPREAD: "one" sends every guess from this address; "many" gives each guess its own
X-Forwarded-For address (the server must trust 127.0.0.1 as a proxy).
Prints one line: base_p50_ms base_p99_ms storm_p50_ms storm_p99_ms storm_s rss_before_mib
peak_rss_mib statuses(json)."""

import asyncio
import json
import sys
import time
from urllib.parse import urlsplit

import rawhttp

url, valid, wrong_id, count, spread, pid = sys.argv[1:7]
count = int(count)
parts = urlsplit(url)
host, port = parts.hostname, parts.port


def rss_kib():
    return rawhttp.rss_kib(pid)


async def request(reader, writer, token, extra=""):
    head = await rawhttp.get_head(reader, writer, host, "/instances?limit=1", token, extra)
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    await reader.readexactly(length)
    return status


async def valid_client(stop, latencies, refused):
    """Sends the valid token's request in a loop: latencies of the 200s, and how many
    answers were anything else (a refusal the valid client noticed), by status."""
    reader, writer = await asyncio.open_connection(host, port)
    while not stop.is_set():
        started = time.perf_counter()
        status = await request(reader, writer, valid)
        if status == 200:
            latencies.append((time.perf_counter() - started) * 1000)
        else:
            refused[f"valid {status}"] = refused.get(f"valid {status}", 0) + 1
        await asyncio.sleep(0.005)
    writer.close()


async def guess(i, statuses):
    extra = f"X-Forwarded-For: 10.{i // 65536 % 256}.{i // 256 % 256}.{i % 256}\r\n" if spread == "many" else ""
    try:
        reader, writer = await asyncio.open_connection(host, port)
        status = await request(reader, writer, f"{wrong_id}-{i:032x}", extra)
        writer.close()
    except (ConnectionError, asyncio.IncompleteReadError) as error:
        status = type(error).__name__
    statuses[str(status)] = statuses.get(str(status), 0) + 1


def percentile(values, p):
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p / 100))]


async def main():
    base = []
    stop = asyncio.Event()
    refused_before = {}
    task = asyncio.create_task(valid_client(stop, base, refused_before))
    await asyncio.sleep(2)
    stop.set()
    await task
    assert not refused_before, f"the valid token was refused before the storm: {refused_before}"

    rss_before = rss_kib()
    peak = rss_before
    during = []
    statuses = {}
    stop = asyncio.Event()
    client = asyncio.create_task(valid_client(stop, during, statuses))
    started = time.perf_counter()
    storm = asyncio.gather(*(guess(i, statuses) for i in range(count)))
    while not storm.done():
        peak = max(peak, rss_kib())
        await asyncio.sleep(0.02)
    await storm
    took = time.perf_counter() - started
    peak = max(peak, rss_kib())
    stop.set()
    await client
    print(
        f"{percentile(base, 50):.2f} {percentile(base, 99):.2f} "
        f"{percentile(during, 50):.2f} {percentile(during, 99):.2f} {took:.2f} "
        f"{rss_before / 1024:.0f} {peak / 1024:.0f} {json.dumps(statuses, separators=(',', ':'))}"
    )


asyncio.run(main())
