"""Pooled POST /instances against on-demand POST→running, and a burst against a pool.

Arguments: API URL, a client token, an admin token, the provider config to use (its
machines boot in a fixed time), the pool size to keep warm, the burst size.

Prints three lines:
  pooled  <p50 ms> <p99 ms>            one POST at a time, each served from the pool
  demand  <p50 ms> <p99 ms>            POST then polls until running, machines booting
  burst   <served warm> <on demand> <refused> <s to send> <s until the pool is full again>
"""
import json
import statistics
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

url, token, admin, provider = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
idle, burst = int(sys.argv[5]), int(sys.argv[6])


def call(method, path, body=None, as_token=token):
    headers = {"Authorization": f"token {as_token}", "Content-Type": "application/json"}
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"{url}{path}", data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def wait_until_idle(n, limit=300):
    start = time.monotonic()
    while time.monotonic() - start < limit:
        status, pool = call("GET", "/pools/bench")
        if pool["counts"]["idle"] >= n:
            return time.monotonic() - start
        time.sleep(0.05)
    raise SystemExit(f"the pool did not reach {n} idle in {limit} s: {pool['counts']}")


def percentiles(samples):
    samples = sorted(samples)
    p99 = samples[min(len(samples) - 1, round(0.99 * (len(samples) - 1)))]
    return statistics.median(samples) * 1000, p99 * 1000


# Room for the machines taken one at a time below, the burst and a full pool after it.
shape = {"provider": provider, "image": "bench-pool", "min_idle": idle, "max_size": 2 * idle + burst}
status, body = call("PUT", "/pools/bench", shape, as_token=admin)
assert status == 200, body
wait_until_idle(idle)

# Pooled: one request at a time, fewer than the pool holds, so each is served warm.
pooled = []
for _ in range(idle * 4 // 5):
    start = time.monotonic()
    status, body = call("POST", "/instances", {"pool": "bench"})
    pooled.append(time.monotonic() - start)
    assert status == 200 and body["state"] == "running", body
print("pooled %.1f %.1f" % percentiles(pooled))

# On demand: the same provider and boot time, asked for one at a time, until running.
demand = []
for i in range(10):
    start = time.monotonic()
    status, body = call("POST", "/instances", {"provider": provider, "image": f"bench-demand-{i}"})
    assert status == 200, body
    while body["state"] != "running":
        time.sleep(0.01)
        status, body = call("GET", f"/instances/{body['id']}")
        assert body["state"] in ("creating", "starting", "running"), body
    demand.append(time.monotonic() - start)
print("demand %.1f %.1f" % percentiles(demand))

# Burst: the pool full again, then `burst` requests at once.
wait_until_idle(idle)
start = time.monotonic()
with ThreadPoolExecutor(32) as threads:
    answers = list(threads.map(lambda _: call("POST", "/instances", {"pool": "bench"}), range(burst)))
sent = time.monotonic() - start
warm = sum(1 for s, b in answers if s == 200 and b["state"] == "running")
on_demand = sum(1 for s, b in answers if s == 200 and b["state"] != "running")
refused = sum(1 for s, _ in answers if s != 200)
ids = [b["id"] for s, b in answers if s == 200]
assert len(ids) == len(set(ids)), "one machine handed out twice"
refill = wait_until_idle(idle)
print(f"burst {warm} {on_demand} {refused} {sent:.2f} {sent + refill:.2f}")
