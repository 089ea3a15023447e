"""The http process's resident memory: idle, while 100 tokens it has never seen are used at
once (each verified once with scrypt), and while 1,000 wrong secrets arrive at once from
1,000 addresses (the server must trust 127.0.0.1 as a proxy); after each, once it settles.

    python3 memory.py URL PID TOKENS_FILE WRONG_ID
Prints one line: idle_mib new_peak_mib new_after_mib storm_peak_mib storm_after_mib
new_statuses(json) storm_statuses(json)."""

import asyncio
import json
import sys
import time
from urllib.parse import urlsplit

import rawhttp

url, pid, tokens_file, wrong_id = sys.argv[1:5]
parts = urlsplit(url)
host, port = parts.hostname, parts.port
tokens = [line.strip() for line in open(tokens_file) if line.strip()]


def rss_mib():
    return rawhttp.rss_kib(pid) / 1024


async def get(token, extra=""):
    try:
        reader, writer = await asyncio.open_connection(host, port)
        head = await rawhttp.get_head(reader, writer, host, "/instances?limit=1", token, extra)
        writer.close()
        return head.split(b" ", 2)[1].decode()
    except (ConnectionError, asyncio.IncompleteReadError) as error:
        return type(error).__name__


async def wave(requests):
    """Runs the requests at once, sampling RSS every 10 ms: (peak, statuses)."""
    peak = rss_mib()
    run = asyncio.gather(*requests)
    while not run.done():
        peak = max(peak, rss_mib())
        await asyncio.sleep(0.01)
    statuses = {}
    for status in await run:
        statuses[status] = statuses.get(status, 0) + 1
    return max(peak, rss_mib()), statuses


async def settled():
    """RSS once it has stopped falling (at most 5 s)."""
    last = rss_mib()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        now = rss_mib()
        if now >= last:
            return now
        last = now
    return last


async def main():
    await asyncio.sleep(1)
    idle = rss_mib()
    new_peak, new = await wave([get(t) for t in tokens])
    new_after = await settled()
    storm = [
        get(f"{wrong_id}-{i:032x}", f"X-Forwarded-For: 10.{i // 65536 % 256}.{i // 256 % 256}.{i % 256}\r\n")
        for i in range(1000)
    ]
    storm_peak, answers = await wave(storm)
    storm_after = await settled()
    compact = lambda d: json.dumps(d, separators=(",", ":"), sort_keys=True)
    print(
        f"{idle:.0f} {new_peak:.0f} {new_after:.0f} {storm_peak:.0f} {storm_after:.0f} "
        f"{compact(new)} {compact(answers)}"
    )


asyncio.run(main())
