"""Sends N POST /instances at once (16 threads) and waits until no instance is `creating`.

Prints: seconds to send them all, seconds until every create job had run.
"""
import json
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

url, token, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
headers = {"Authorization": f"token {token}", "Content-Type": "application/json"}


def post(i):
    body = json.dumps({"provider": "fake", "image": f"burst-{i}"}).encode()
    request = urllib.request.Request(f"{url}/instances", data=body, headers=headers, method="POST")
    with urllib.request.urlopen(request) as response:
        assert response.status == 200, response.status


def creating():
    request = urllib.request.Request(f"{url}/instances?state=creating&limit=1", headers=headers)
    with urllib.request.urlopen(request) as response:
        return len(json.load(response)["instances"])


start = time.monotonic()
with ThreadPoolExecutor(16) as pool:
    list(pool.map(post, range(n)))
sent = time.monotonic() - start
deadline = start + 120
while creating() and time.monotonic() < deadline:
    time.sleep(0.01)
print(f"{sent:.3f} {time.monotonic() - start:.3f}")
