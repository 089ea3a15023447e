"""Dispatch latency at a steady rate: POST /instances RATE times a second for SECONDS on one
kept-alive connection, then the create worker's histogram of enqueue → provider call
over those jobs (the difference of its /metrics before and after).

    dispatch.py URL TOKEN RATE SECONDS METRICS_URL

Prints: "jobs p50-bound p99-bound over-5ms" (ms), each bound the upper bound of the
histogram bucket that holds that quantile; then how many jobs waited longer than 5 ms.
"""
import http.client
import json
import re
import sys
import time
import urllib.parse
import urllib.request

url, token, rate, seconds, metrics_url = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4]), sys.argv[5]


def histogram():
    text = urllib.request.urlopen(metrics_url).read().decode()
    buckets = {}
    for m in re.finditer(r'cloudbrain_dispatch_latency_seconds_bucket\{le="([^"]+)"\} (\d+)', text):
        buckets[m.group(1)] = int(m.group(2))
    return buckets


before = histogram()
target = urllib.parse.urlsplit(url)
conn = http.client.HTTPConnection(target.hostname, target.port)
headers = {"Authorization": f"token {token}", "Content-Type": "application/json"}
body = json.dumps({"provider": "fake", "image": "dispatch"})
n = int(rate * seconds)
start = time.monotonic()
for i in range(n):
    # Paced from the start, so a slow answer does not shift the ones after it.
    delay = start + i / rate - time.monotonic()
    if delay > 0:
        time.sleep(delay)
    conn.request("POST", "/instances", body=body, headers=headers)
    response = conn.getresponse()
    response.read()
    if response.status != 200:
        raise SystemExit(f"dispatch: POST answered {response.status}")
time.sleep(1)
after = histogram()
counts = sorted((float(le), after[le] - before.get(le, 0)) for le in after if le != "+Inf")
total = after["+Inf"] - before.get("+Inf", 0)


def bound(q):
    return next((le * 1000 for le, count in counts if count >= q * total), float("inf"))


within_5ms = next(count for le, count in counts if le == 0.005)
print(f"{total} {bound(0.5):g} {bound(0.99):g} {total - within_5ms}")
