"""Times refresh cycles over a fleet of N running instances whose machines the fake cloud
(kept in Postgres) lists exactly as the rows say, then a cycle in which 1 % of the
machines changed their address.

    refresh.py BIN DATABASE_URL N [N...]

DATABASE_URL names an empty, migrated database with a token and a provider config
`fake` whose `store_url` is that database. The fleet grows to each N in turn; a
refresh worker (BIN refresh-worker, debug logs of its refresh module on stderr) runs
over it, and each of its "refreshed" lines says how long one provider config took and
how many rows it wrote. Prints one line per N: "N mean-ms max-ms rows-written" (over
three cycles), then "changed N changed ms written rows-now-right next-ms next-written"
for the first cycle of a new worker after the change and the cycle after it.
"""
import os
import re
import subprocess
import sys
import threading
import time

bin_path, url, sizes = sys.argv[1], sys.argv[2], [int(n) for n in sys.argv[3:]]


def psql(sql):
    out = subprocess.run(["psql", "-Atq", "-v", "ON_ERROR_STOP=1", url, "-c", sql],
                         check=True, capture_output=True, text=True)
    return out.stdout.strip()


class Worker:
    """A refresh worker whose "refreshed" log lines are collected as they come."""

    LINE = re.compile(r'refreshed fake: (\d+) machines, (\d+) rows written in ([0-9.]+) ms')

    def __init__(self):
        env = dict(os.environ, DATABASE_URL=url, CLOUDBRAIN_REFRESH_INTERVAL="0",
                   RUST_LOG="warn,cloudbrain::workers::refresh=debug", NO_COLOR="1")
        env.pop("CLOUDBRAIN_METRICS_ADDR", None)
        self.process = subprocess.Popen([bin_path, "refresh-worker"], env=env,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.cycles = []
        self.lock = threading.Lock()
        threading.Thread(target=self.read, daemon=True).start()

    def read(self):
        for line in self.process.stderr:
            m = self.LINE.search(line)
            if m:
                with self.lock:
                    self.cycles.append((int(m.group(1)), int(m.group(2)), float(m.group(3))))

    def next_cycles(self, n, machines, timeout=300):
        """The next n cycles that listed `machines` machines, once they are done."""
        with self.lock:
            seen = len(self.cycles)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                done = [c for c in self.cycles[seen:] if c[0] == machines]
            if len(done) >= n:
                return done[:n]
            time.sleep(0.01)
        raise SystemExit(f"refresh worker: no {n} cycles over {machines} machines in {timeout} s")

    def stop(self):
        self.process.terminate()
        self.process.wait()


def grow(to, have):
    """Adds running instances (and their machines) until the fleet holds `to`."""
    n = to - have
    psql(f"""
        BEGIN;
        CREATE TEMP TABLE fresh AS
          SELECT gen_random_uuid() AS id, i FROM generate_series(1, {n}) AS i;
        INSERT INTO instances (id, owner_token_id, provider_name, image, instance_type, state,
                               ip_address, upstream_id, created_at, updated_at)
          SELECT id, (SELECT min(id) FROM auth_tokens), 'fake', 'bench', 'standard', 'running',
                 '10.{have % 250}.' || (i / 250 % 250) || '.' || (i % 250),
                 'fake-' || id, now() - interval '1 hour', now() - interval '1 hour'
          FROM fresh;
        INSERT INTO fake_cloud.machines (provider, instance_id, upstream_id, image, instance_type,
                                         ip_address, created_at, boots_at)
          SELECT 'fake', id, 'fake-' || id, 'bench', 'standard',
                 '10.{have % 250}.' || (i / 250 % 250) || '.' || (i % 250),
                 now() - interval '1 hour', now() - interval '1 hour'
          FROM fresh;
        COMMIT;
        ANALYZE instances; ANALYZE fake_cloud.machines;""")


# Its first cycle makes the fake cloud's schema. The fleet grows while no worker runs:
# rows are backdated, so a cycle that listed the cloud before they came would take their
# machines for vanished.
worker = Worker()
worker.next_cycles(1, 0)
have = 0
for size in sizes:
    worker.stop()
    grow(size, have)
    have = size
    worker = Worker()
    # One cycle to settle (the one running while rows were added may have seen part of
    # them), then three measured.
    (first,) = worker.next_cycles(1, size)
    cycles = worker.next_cycles(3, size)
    ms = [c[2] for c in cycles]
    print(f"{size} {sum(ms) / len(ms):.0f} {max(ms):.0f} {sum(c[1] for c in cycles)} {first[2]:.0f}", flush=True)

changed = have // 100
# A new worker after the change, so that its first cycle is the one that finds it.
worker.stop()
psql(f"""UPDATE fake_cloud.machines SET ip_address = '192.168.' || (random() * 250)::int || '.1'
         WHERE instance_id IN (SELECT instance_id FROM fake_cloud.machines ORDER BY instance_id
                               LIMIT {changed})""")
worker = Worker()
found, after = worker.next_cycles(2, have)
updated = int(psql("SELECT count(*) FROM instances WHERE ip_address LIKE '192.168.%'"))
worker.stop()
print(f"changed {have} {changed} {found[2]:.0f} {found[1]} {updated} {after[2]:.0f} {after[1]}", flush=True)
