# Shared shell functions for cloudbrain's scripts. Source it; do not run it.

# The cargo target directory persists across runs on one machine (builds are slow here);
# nothing depends on it being there.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/cloudbrain-target}"

cb_log() { printf '%s\n' "$*" >&2; }

# After a wrk run with script/bench.d/tokens.lua: when wrk counted answers other than 2xx
# in OUT, says so, shows wrk's report and one answer (the first token's request, replayed
# with curl: BENCH_BODY and BENCH_PATH as tokens.lua reads them), and fails.
# usage: cb_wrk_check OUT BASE_URL TOKENS_FILE WHAT
cb_wrk_check() {
    grep -q "Non-2xx" "$1" || return 0
    cb_log "answers other than 2xx to $4:"
    cat "$1" >&2
    local token path
    read -r token path <"$3"
    if [ -n "${BENCH_BODY:-}" ]; then
        curl -s -w '\n(%{http_code})\n' -H "Authorization: token $token" \
            -H "Content-Type: application/json" -d "$BENCH_BODY" "$2/instances" >&2
    else
        curl -s -w '\n(%{http_code})\n' -H "Authorization: token $token" \
            "$2${path:-${BENCH_PATH:-/instances?limit=10}}" >&2
    fi
    return 1
}

# Installs Debian packages the machine lacks, saying so first, and never upgrades one that
# is there: when installing would upgrade an installed package (a newer dependency, say),
# it stops and says which, so the operator decides.
cb_apt_install() {
    if [ "$(id -u)" -ne 0 ]; then
        cb_log "error: missing Debian packages $*: install them (as root: apt-get install $*)"
        return 1
    fi
    cb_log "installing Debian's $* (missing on this machine)"
    apt-get update -qq
    local upgrades
    upgrades=$(apt-get install -s --no-upgrade --no-install-recommends "$@" 2>/dev/null | awk '/^Inst [^ ]+ \[/ {print $2}' | tr '\n' ' ')
    if [ -n "$upgrades" ]; then
        cb_log "error: installing $* would upgrade installed packages: $upgrades; install $* yourself"
        return 1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-upgrade --no-install-recommends "$@" >/dev/null
}

# Runs a command as the unprivileged user that owns the throwaway cluster.
cb_as_pg_user() {
    if [ "$(id -u)" -eq 0 ]; then
        runuser -u "$CB_PG_USER" -- "$@"
    else
        "$@"
    fi
}

cb_free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Finds (or installs) PostgreSQL's server binaries and puts them on PATH.
cb_find_postgres() {
    if ! command -v initdb >/dev/null 2>&1; then
        local bin
        bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
        if [ -z "$bin" ]; then
            cb_log "PostgreSQL server binaries (initdb, pg_ctl) not found"
            cb_apt_install postgresql || return 1
            bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
        fi
        export PATH="$bin:$PATH"
    fi
}

# Starts a throwaway PostgreSQL cluster on a free loopback port and exports DATABASE_URL.
# Commits are not flushed to disk (fsync off) unless CB_PG_DURABLE=1.
# Postgres refuses to run as root, so as root the cluster belongs to the `postgres` user
# (created when missing). Call cb_stop_postgres to remove it.
cb_start_postgres() {
    cb_find_postgres || return 1
    CB_PG_USER="$(id -un)"
    if [ "$(id -u)" -eq 0 ]; then
        CB_PG_USER=postgres
        id -u "$CB_PG_USER" >/dev/null 2>&1 || useradd --system --no-create-home "$CB_PG_USER"
    fi
    CB_PG_DIR=$(mktemp -d "${TMPDIR:-/tmp}/cloudbrain-pg.XXXXXX")
    chmod 755 "$CB_PG_DIR"
    [ "$(id -u)" -eq 0 ] && chown "$CB_PG_USER" "$CB_PG_DIR"
    local port durability="-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
    # CB_PG_DURABLE=1: Postgres's own defaults, every commit flushed to disk.
    [ "${CB_PG_DURABLE:-}" = 1 ] && durability=""
    port=$(cb_free_port)
    cb_as_pg_user initdb -D "$CB_PG_DIR/data" -U postgres --auth=trust -E UTF8 --no-sync >"$CB_PG_DIR/initdb.log" 2>&1 || {
        cat "$CB_PG_DIR/initdb.log" >&2
        return 1
    }
    cb_as_pg_user pg_ctl -D "$CB_PG_DIR/data" -l "$CB_PG_DIR/postgres.log" -w -t 60 \
        -o "-c listen_addresses=127.0.0.1 -p $port -k $CB_PG_DIR -c max_connections=400 $durability" \
        start >/dev/null || {
        cat "$CB_PG_DIR/postgres.log" >&2
        return 1
    }
    export DATABASE_URL="postgres://postgres@127.0.0.1:$port/postgres"
    export CB_PG_DIR CB_PG_USER
    cb_log "throwaway PostgreSQL on 127.0.0.1:$port ($CB_PG_DIR)"
}

cb_stop_postgres() {
    if [ -n "${CB_PG_DIR:-}" ] && [ -d "$CB_PG_DIR" ]; then
        cb_as_pg_user pg_ctl -D "$CB_PG_DIR/data" -m immediate -w stop >/dev/null 2>&1 || true
        rm -rf "$CB_PG_DIR"
    fi
}

# diesel's CLI, for the test that checks src/db/schema.rs against `diesel print-schema`.
cb_ensure_diesel_cli() {
    if ! command -v diesel >/dev/null 2>&1 && [ -x "$HOME/.cargo/bin/diesel" ]; then
        export PATH="$HOME/.cargo/bin:$PATH"
    fi
    if ! command -v diesel >/dev/null 2>&1; then
        # diesel_cli links libpq: its development files must be there (the package, or a
        # libpq.so from elsewhere).
        if ! dpkg-query -W -f='${Status}' libpq-dev 2>/dev/null | grep -q 'ok installed' \
            && ! ldconfig -p 2>/dev/null | grep -q 'libpq\.so[[:space:]]'; then
            # Pinned to the installed libpq5, so the client library is never upgraded.
            local libpq
            libpq=$(dpkg-query -W -f='${Version}' libpq5 2>/dev/null || true)
            cb_apt_install "libpq-dev${libpq:+=$libpq}"
        fi
        cb_log "installing diesel_cli (postgres only) with cargo into ~/.cargo/bin (a few minutes)"
        cargo install --locked diesel_cli --version '^2.3' --no-default-features --features postgres
        export PATH="$HOME/.cargo/bin:$PATH"
    fi
}

# httpie, for the end-to-end test of script/cloud-brain: the machine's, or one installed
# from PyPI into the project's own .venv.
cb_ensure_httpie() {
    if command -v http >/dev/null 2>&1; then
        return 0
    fi
    if [ ! -x .venv/bin/http ]; then
        cb_log "installing httpie into .venv"
        python3 -m venv .venv
        .venv/bin/pip install --quiet --disable-pip-version-check httpie
    fi
    export PATH="$PWD/.venv/bin:$PATH"
}

# moto_server (the AWS API emulator, from PyPI) in the project's .venv, for the EC2 tests.
cb_ensure_moto() {
    if [ ! -x .venv/bin/moto_server ]; then
        [ -x .venv/bin/python ] || python3 -m venv .venv
        cb_log "installing moto[server] into .venv"
        .venv/bin/pip install --quiet --disable-pip-version-check "moto[server]"
    fi
    export MOTO_SERVER="$PWD/.venv/bin/moto_server"
}

# Google's Compute discovery document (google-api-python-client) and libcloud's recorded
# Compute responses (apache-libcloud), from PyPI into .venv: the GCE tests check the fake
# Compute API against them.
cb_ensure_gce_references() {
    [ -x .venv/bin/python ] || python3 -m venv .venv
    if ! .venv/bin/python -c 'import libcloud, googleapiclient' 2>/dev/null; then
        cb_log "installing apache-libcloud and google-api-python-client into .venv"
        .venv/bin/pip install --quiet --disable-pip-version-check apache-libcloud google-api-python-client
    fi
}

# kubernetes-validate (from PyPI, into .venv; it carries Kubernetes' schemas), which checks
# deploy/kubernetes offline.
cb_ensure_kubernetes_validate() {
    [ -x .venv/bin/python ] || python3 -m venv .venv
    if [ ! -x .venv/bin/kubernetes-validate ]; then
        cb_log "installing kubernetes-validate into .venv"
        .venv/bin/pip install --quiet --disable-pip-version-check kubernetes-validate
    fi
}

# Debian's chromium and chromium-driver, which the control-plane page's tests drive.
cb_ensure_chromium() {
    command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1 && return 0
    cb_apt_install chromium chromium-driver
}

# schemathesis (from PyPI, into .venv), the schema-driven API fuzzer.
cb_ensure_schemathesis() {
    [ -x .venv/bin/python ] || python3 -m venv .venv
    if [ ! -x .venv/bin/st ]; then
        cb_log "installing schemathesis into .venv"
        .venv/bin/pip install --quiet --disable-pip-version-check schemathesis
    fi
}

# Fuzzes the API from its own /openapi.json for about a minute: `cloudbrain dev -f
# examples/fleet.yaml` (built binary $1, so pool `ci` is there to ask for) on a throwaway
# cluster of its own, its token, every check schemathesis has but the ones
# schemathesis.toml explains. Fails on any finding.
cb_run_schemathesis() {
    local bin=$1 port out pid token status=0
    port=$(cb_free_port)
    out=$(mktemp)
    env -u DATABASE_URL CLOUDBRAIN_ADDR="127.0.0.1:$port" CLOUDBRAIN_STREAM_HEARTBEAT=0.2 RUST_LOG=warn \
        "$bin" dev -f examples/fleet.yaml >"$out" &
    pid=$!
    for _ in $(seq 300); do
        token=$(sed -n 's/^token: *//p' "$out")
        [ -n "$token" ] && curl -sf "http://127.0.0.1:$port/healthz" >/dev/null 2>&1 && break
        sleep 0.1
    done
    if [ -z "$token" ]; then
        cb_log "cloudbrain dev did not start for schemathesis"
        kill -TERM "$pid" 2>/dev/null || true
        rm -f "$out"
        return 1
    fi
    .venv/bin/st run "http://127.0.0.1:$port/openapi.json" -H "Authorization: token $token" \
        --max-time 60 --request-timeout 20 || status=$?
    kill -TERM "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    rm -f "$out"
    return "$status"
}

# Debian's pgbouncer, which the test of running behind a transaction pooler starts.
cb_ensure_pgbouncer() {
    command -v pgbouncer >/dev/null 2>&1 && return 0
    [ -x /usr/sbin/pgbouncer ] && return 0
    cb_apt_install pgbouncer
}

# Starts Debian's pgbouncer in transaction mode on a free loopback port in front of the
# database at $1 (postgres://user@host:port/name, trust auth) with $2 server connections,
# and sets CB_PGBOUNCER_URL (the same database through it), CB_PGBOUNCER_PID and
# CB_PGBOUNCER_DIR (its config and log). As root it drops to `nobody`. Stop it with kill,
# then remove the directory.
cb_start_pgbouncer() {
    cb_ensure_pgbouncer || return 1
    local url=$1 size=$2 rest user server name dir port bin
    rest=${url#*://}
    user=${rest%%@*}
    server=${rest#*@}
    server=${server%%/*}
    name=${rest#*/}
    name=${name%%\?*}
    dir=$(mktemp -d "${TMPDIR:-/tmp}/cloudbrain-pgbouncer.XXXXXX")
    chmod 755 "$dir"
    port=$(cb_free_port)
    printf '"%s" ""\n' "$user" >"$dir/users.txt"
    cat >"$dir/pgbouncer.ini" <<INI
[databases]
$name = host=${server%:*} port=${server##*:}
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $port
unix_socket_dir =
auth_type = trust
auth_file = $dir/users.txt
pool_mode = transaction
default_pool_size = $size
max_client_conn = 1000
INI
    chmod 644 "$dir"/*
    bin=$(command -v pgbouncer || echo /usr/sbin/pgbouncer)
    if [ "$(id -u)" -eq 0 ]; then
        "$bin" -u nobody "$dir/pgbouncer.ini" >/dev/null 2>"$dir/pgbouncer.log" &
    else
        "$bin" "$dir/pgbouncer.ini" >/dev/null 2>"$dir/pgbouncer.log" &
    fi
    CB_PGBOUNCER_PID=$!
    for _ in $(seq 100); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            CB_PGBOUNCER_URL="postgres://$user@127.0.0.1:$port/$name"
            CB_PGBOUNCER_DIR=$dir
            export CB_PGBOUNCER_URL CB_PGBOUNCER_PID CB_PGBOUNCER_DIR
            return 0
        fi
        sleep 0.1
    done
    cat "$dir/pgbouncer.log" >&2
    return 1
}

# Waits (at most $2 seconds) until the machine is quiet: no autovacuum worker running on
# the cluster at $1 and the CPUs at least 80 % idle over a second. For figures that are
# latencies, taken after heavy runs; says how long it waited.
cb_wait_quiet() {
    local url=$1 most=$2 waited=0 vacuums busy
    while [ "$waited" -lt "$most" ]; do
        vacuums=$(psql -Atq "$url" -c "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'autovacuum worker'")
        busy=$(python3 -c '
import time
def sample():
    fields = [int(f) for f in open("/proc/stat").readline().split()[1:]]
    return sum(fields), fields[3] + fields[4]
(t0, i0) = sample(); time.sleep(1); (t1, i1) = sample()
print(round(100 * (1 - (i1 - i0) / max(t1 - t0, 1))))')
        waited=$((waited + 1))
        [ "$vacuums" = 0 ] && [ "$busy" -le 20 ] && break
    done
    cb_log "waited ${waited} s for a quiet machine (autovacuum workers: $vacuums, CPU busy: $busy %)"
}
