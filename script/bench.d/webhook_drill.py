"""A webhook receiver killed and restarted while deliveries flow: registers a webhook for
the `creating` events, sends COUNT POST /instances over about four seconds, SIGKILLs the
receiver one second in and starts it again on the same port two seconds later, then waits
until the server has every delivery delivered and counts what the receiver got.

    python3 webhook_drill.py URL ADMIN_TOKEN CLIENT_TOKEN COUNT
Prints one line: deliveries distinct_received duplicates lost seconds_until_all_delivered."""

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

url, admin, client, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])

RECEIVER = r"""
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer
port, path = int(sys.argv[1]), sys.argv[2]
class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        with open(path, "a") as seen:
            seen.write(self.headers["Cloudbrain-Delivery"] + "\n")
        self.send_response(204)
        self.end_headers()
    def log_message(self, *args):
        pass
HTTPServer.allow_reuse_address = True
HTTPServer(("127.0.0.1", port), Handler).serve_forever()
"""


def call(method, path, token, body=None):
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        f"{url}{path}",
        data=data,
        method=method,
        headers={"Authorization": f"token {token}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


work = tempfile.mkdtemp()
seen_path = os.path.join(work, "seen")
open(seen_path, "w").close()
script = os.path.join(work, "receiver.py")
with open(script, "w") as f:
    f.write(RECEIVER)
port = free_port()


def start_receiver():
    receiver = subprocess.Popen([sys.executable, script, str(port), seen_path])
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            return receiver
        except OSError:
            time.sleep(0.05)
    raise SystemExit("the receiver did not start")


receiver = start_receiver()
hook = call(
    "POST",
    "/webhooks",
    admin,
    {"url": f"http://127.0.0.1:{port}/hook", "secret": "drill-secret-0123456789", "events": ["creating"]},
)


def send():
    for i in range(count):
        call("POST", "/instances", client, {"provider": "fake", "image": f"drill-{i}"})
        time.sleep(4 / count)


sender = threading.Thread(target=send)
started = time.monotonic()
sender.start()
time.sleep(1)
receiver.send_signal(signal.SIGKILL)
receiver.wait()
time.sleep(2)
receiver = start_receiver()
sender.join()
deadline = time.monotonic() + 120
while time.monotonic() < deadline:
    listed = call("GET", f"/webhooks/{hook['id']}/deliveries?limit=1000", admin)["deliveries"]
    if len(listed) == count and all(d["status"] == "delivered" for d in listed):
        break
    time.sleep(0.2)
else:
    raise SystemExit(f"not every delivery was delivered: {len(listed)} listed")
took = time.monotonic() - started
receiver.terminate()
lines = [line for line in open(seen_path).read().split() if line]
ids = {d["id"] for d in listed}
distinct = set(int(line) for line in lines)
lost = len(ids - distinct)
print(f"{len(ids)} {len(distinct & ids)} {len(lines) - len(distinct)} {lost} {took:.1f}")
