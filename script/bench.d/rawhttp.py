"""What the bench's asyncio probes share: a process's resident memory, and a request head
written and its answer's head read on a raw connection (thousands of them at once cost
the probe little)."""


def rss_kib(pid):
    """The process's resident set, KiB (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except FileNotFoundError:
        pass
    return 0


async def get_head(reader, writer, host, path, token, extra=""):
    """Sends `GET path` with the token (and `extra` header lines, each ending in CRLF);
    returns the answer's head, status line first."""
    writer.write(
        (
            f"GET {path} HTTP/1.1\r\nHost: {host}\r\n"
            f"Authorization: token {token}\r\n{extra}\r\n"
        ).encode()
    )
    await writer.drain()
    return await reader.readuntil(b"\r\n\r\n")
