"""The create pipeline, POST to `running`, on a fake cloud with no latency and no boot time.

    pipeline.py MODE BIN WORKERS URL TOKENS_FILE SECONDS DATABASE_URL POSTMASTER_PID HTTP_PID

MODE `pipeline`: WORKERS create workers (BIN create-worker) start, then wrk POSTs
/instances for SECONDS as fast as the http process answers while they make the machines;
the run ends when every instance acknowledged is `running`. MODE `drain`: wrk POSTs first
with no worker running, then the workers start and drain that backlog.

Prints one line: "instances seconds per-second cpu-ms-per-instance http-ms worker-ms
postgres-ms client-ms added-cpu-% added-jobs", the rate and CPU counted over the measured
part (the whole run; for `drain`, from the workers' start), the CPU split in ms per
instance (every worker together, Postgres's every process, the client being wrk and this
probe); then what the workers after the first cost and did: their CPU over their whole
lives, start included, with their database sessions' (each worker names its sessions
`cloudbrain-worker-N`), as a share of all the CPU of the measured part, and the jobs they
ended (0 and 0 with one worker).
"""
import os
import re
import socket
import urllib.error
import urllib.request
import subprocess
import sys
import time

mode, bin_path, n_workers = sys.argv[1], sys.argv[2], int(sys.argv[3])
url, tokens, seconds, db = sys.argv[4], sys.argv[5], float(sys.argv[6]), sys.argv[7]
postmaster, http = int(sys.argv[8]), int(sys.argv[9])
workers = []
ports = []
TICK = os.sysconf("SC_CLK_TCK")


def stat(pid):
    with open(f"/proc/{pid}/stat") as f:
        # The command may hold spaces: fields count from the closing parenthesis.
        return f.read().rsplit(")", 1)[1].split()


def cpu(pid, children=False):
    """Seconds of CPU `pid` used (and the children it waited for, if asked)."""
    fields = stat(pid)
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / TICK


def postgres_cpu():
    """The postmaster, the backends it reaped, and every process it runs now."""
    total = cpu(postmaster, children=True)
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if int(stat(entry)[1]) == postmaster:
                    total += cpu(entry)
            except (FileNotFoundError, ProcessLookupError, IndexError):
                pass
    return total


def snapshot():
    """CPU seconds so far: http, the workers, Postgres, the client. A worker is a child of
    this probe, as wrk is: each is counted while it runs, and in the probe's children's
    time once it has been waited for."""
    live = sum(cpu(w.pid) for w in workers if w.poll() is None)
    return (cpu(http), live, postgres_cpu(), cpu(os.getpid(), children=True))


# One session for the probe's polling, opened before the clock starts.
psql = subprocess.Popen(["psql", "-Atq", db], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def counts():
    psql.stdin.write("SELECT count(*) FILTER (WHERE state <> 'running'), count(*) FROM instances;\n")
    psql.stdin.flush()
    waiting, total = psql.stdout.readline().strip().split("|")
    return int(waiting), int(total)


def post():
    wrk = subprocess.run(
        ["wrk", "-t2", "-c16", f"-d{seconds:g}s", "-s", "script/bench.d/tokens.lua", url],
        env=dict(os.environ, TOKENS_FILE=tokens, BENCH_BODY='{"provider":"fake","image":"pipeline"}'),
        capture_output=True, text=True, check=True)
    if "Non-2xx" in wrk.stdout:
        raise SystemExit(f"pipeline: answers other than 200:\n{wrk.stdout}{wrk.stderr}\n{one_answer()}")


def one_answer():
    """The first token's POST, replayed: what wrk only counted."""
    with open(tokens) as f:
        token = f.readline().split()[0]
    request = urllib.request.Request(
        f"{url}/instances", data=b'{"provider":"fake","image":"pipeline"}', method="POST",
        headers={"Authorization": f"token {token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request) as answer:
            return f"{answer.status} {answer.read().decode()}"
    except urllib.error.HTTPError as error:
        return f"{error.code} {error.read().decode()}"


def session_name(worker):
    return f"cloudbrain-worker-{worker}"


def added_workers():
    """The CPU seconds of every worker after the first, with their database sessions', over
    their whole lives so far; and the jobs they ended (from their /metrics)."""
    psql.stdin.write("SELECT string_agg(pid || '=' || application_name, ',') FROM pg_stat_activity;\n")
    psql.stdin.flush()
    sessions = dict(entry.split("=", 1) for entry in psql.stdout.readline().strip().split(","))
    added = {session_name(i) for i in range(1, len(workers))}
    seconds = sum(cpu(w.pid) for w in workers[1:])
    for pid, name in sessions.items():
        if name in added:
            try:
                seconds += cpu(pid)
            except (FileNotFoundError, ProcessLookupError):
                pass
    jobs = 0
    for port in ports[1:]:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
        jobs += sum(int(float(n)) for n in re.findall(r"cloudbrain_jobs_finished_total\{[^}]*\} (\S+)", text))
    return seconds, jobs


def start_workers():
    """The workers, each once it answers on its metrics address."""
    for _ in range(n_workers):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = dict(os.environ, CLOUDBRAIN_METRICS_ADDR=f"127.0.0.1:{port}", CLOUDBRAIN_WORKER_CONCURRENCY=os.environ.get("CLOUDBRAIN_WORKER_CONCURRENCY", "64"))
        env["DATABASE_URL"] = f"{db}{'&' if '?' in db else '?'}application_name={session_name(len(workers))}"
        workers.append(subprocess.Popen([bin_path, "create-worker"], env=env))
        ports.append(port)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz").read()
                break
            except OSError:
                time.sleep(0.02)


_, base_total = counts()
if mode == "pipeline":
    start_workers()
    before = snapshot()
    start = time.monotonic()
    post()
else:
    post()
    # The workers' start is measured: from their launch, as an operator scaling up would.
    start = time.monotonic()
    before = snapshot()
    start_workers()
deadline = time.monotonic() + 300
while True:
    waiting, total = counts()
    if not waiting or time.monotonic() > deadline:
        break
    time.sleep(0.02)
took = time.monotonic() - start
after = snapshot()
added_seconds, added_jobs = added_workers()
for worker in workers:
    worker.terminate()
    worker.wait()
psql.stdin.close()
psql.wait()
n = total - base_total
if waiting:
    raise SystemExit(f"pipeline: {waiting} instances not running after 300 s")
split = [(a - b) * 1000 / n for a, b in zip(after, before)]
share = 100 * added_seconds * 1000 / n / sum(split)
print(f"{n} {took:.2f} {n / took:.0f} {sum(split[:3]):.2f} " + " ".join(f"{ms:.2f}" for ms in split)
      + f" {share:.1f} {added_jobs}")
