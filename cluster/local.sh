#!/usr/bin/env bash
# cluster/local.sh up|down|status
#
# A two-node Ray cluster plus an MLflow tracking server on THIS machine, for developing
# the multi-node code paths (Tune trials spread over nodes, Ray Train workers on another
# raylet, `ray job submit` with a working_dir) without a cloud account.
#
#   eval "$(cluster/local.sh up)"     # start; stdout is only `export ...` lines
#   cluster/local.sh status
#   cluster/local.sh down             # stops exactly what `up` started; safe to repeat
#
# What `up` starts, each in its own session so that `down` can stop it without touching
# any other Ray on the machine (`ray stop` would kill every Ray process of this user):
#   head    ray start --head, dashboard on 127.0.0.1, $PASSRAY_HEAD_CPUS logical CPUs
#   node2   ray start --address, $PASSRAY_NODE2_CPUS CPUs and the custom resource
#           {"node2": 1}, so a task can be pinned to it and tests can tell nodes apart
#   mlflow  mlflow server, sqlite backend + proxied artifacts under the state dir
#
# Token authentication (Ray >= 2.52; Ray 2.59+ enables it by default for new local
# clusters made by `ray.init()` and for `ray start --head` when a token already exists):
# we never rely on that implicit default. RAY_AUTH_MODE is set explicitly for every
# process: `token` (default) with a token in $STATE/auth_token passed through
# RAY_AUTH_TOKEN_PATH, or `disabled` with PASSRAY_LOCAL_AUTH=disabled. Clients such as
# `ray job submit` only send the token when *their* environment has RAY_AUTH_MODE=token,
# which is why `up` prints it. ~/.ray/auth_token is neither read nor written.
#
# Environment (all optional):
#   PASSRAY_LOCAL_DIR        state dir: pids, logs, token, mlflow.db   [<repo>/.local-cluster]
#   PASSRAY_RAY_PORT         GCS port of the head                      [6379]
#   PASSRAY_DASHBOARD_PORT   dashboard / job API (http)                [8265]
#   PASSRAY_MLFLOW_PORT      mlflow server                             [5000]
#   PASSRAY_RAY_CLIENT_PORT  Ray Client server on the head             [10001]
#   PASSRAY_AGENT_PORT       head's dashboard agent HTTP port; node2 uses +1   [52365]
#   PASSRAY_HEAD_CPUS / PASSRAY_NODE2_CPUS   logical CPUs per node    [2 / 2]
#   PASSRAY_HEAD_GPUS        GPUs of the head (unset: auto-detect)
#   PASSRAY_NODE2_GPUS       GPUs of node2 (0: the same physical GPU must not be counted twice) [0]
#   PASSRAY_OBJECT_STORE_MB  object store per node, MiB               [1024]
#   PASSRAY_MLFLOW_WORKERS   mlflow server worker processes           [2]
#   PASSRAY_LOCAL_AUTH       token | disabled                         [token]
#   PASSRAY_RAY_TMPDIR       Ray temp root (short: unix socket paths are limited to ~107 bytes)
#                            [$STATE/ray, or /tmp/passray-<uid>-<ray port> when $STATE is long]
#   PASSRAY_UP_TIMEOUT       seconds to wait for each component       [90]
#   PASSRAY_STOP_GRACE       seconds between SIGTERM and SIGKILL in `down`     [10]
set -euo pipefail

usage() {
    sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'
}

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# --- binaries: the project's venv when there is one --------------------------------
if [[ -n "${VIRTUAL_ENV:-}" && -x "${VIRTUAL_ENV}/bin/ray" ]]; then
    export PATH="${VIRTUAL_ENV}/bin:${PATH}"
elif [[ -x "${REPO_ROOT}/.venv/bin/ray" ]]; then
    export PATH="${REPO_ROOT}/.venv/bin:${PATH}"
fi
PY="$(command -v python3 || command -v python || true)"

# --- settings ------------------------------------------------------------------------
STATE_IN="${PASSRAY_LOCAL_DIR:-${REPO_ROOT}/.local-cluster}"
RAY_PORT="${PASSRAY_RAY_PORT:-6379}"
DASH_PORT="${PASSRAY_DASHBOARD_PORT:-8265}"
MLFLOW_PORT="${PASSRAY_MLFLOW_PORT:-5000}"
CLIENT_PORT="${PASSRAY_RAY_CLIENT_PORT:-10001}"
AGENT_PORT="${PASSRAY_AGENT_PORT:-52365}"
HEAD_CPUS="${PASSRAY_HEAD_CPUS:-2}"
NODE2_CPUS="${PASSRAY_NODE2_CPUS:-2}"
HEAD_GPUS="${PASSRAY_HEAD_GPUS:-}"
NODE2_GPUS="${PASSRAY_NODE2_GPUS:-0}"
OBJECT_STORE_MB="${PASSRAY_OBJECT_STORE_MB:-1024}"
MLFLOW_WORKERS="${PASSRAY_MLFLOW_WORKERS:-2}"
AUTH="${PASSRAY_LOCAL_AUTH:-token}"
UP_TIMEOUT="${PASSRAY_UP_TIMEOUT:-90}"
STOP_GRACE="${PASSRAY_STOP_GRACE:-10}"

log() { printf '[local.sh] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

check_settings() {
    local pair name value
    for pair in RAY_PORT:PASSRAY_RAY_PORT DASH_PORT:PASSRAY_DASHBOARD_PORT \
        MLFLOW_PORT:PASSRAY_MLFLOW_PORT CLIENT_PORT:PASSRAY_RAY_CLIENT_PORT \
        AGENT_PORT:PASSRAY_AGENT_PORT HEAD_CPUS:PASSRAY_HEAD_CPUS NODE2_CPUS:PASSRAY_NODE2_CPUS \
        NODE2_GPUS:PASSRAY_NODE2_GPUS OBJECT_STORE_MB:PASSRAY_OBJECT_STORE_MB \
        MLFLOW_WORKERS:PASSRAY_MLFLOW_WORKERS UP_TIMEOUT:PASSRAY_UP_TIMEOUT \
        STOP_GRACE:PASSRAY_STOP_GRACE; do
        name="${pair%%:*}"
        value="${!name}"
        [[ "$value" =~ ^[0-9]+$ ]] || die "${pair#*:} must be a non-negative integer, got '$value'"
    done
    [[ -z "$HEAD_GPUS" || "$HEAD_GPUS" =~ ^[0-9]+$ ]] ||
        die "PASSRAY_HEAD_GPUS must be empty or an integer, got '$HEAD_GPUS'"
    [[ "$AUTH" == token || "$AUTH" == disabled ]] ||
        die "PASSRAY_LOCAL_AUTH must be 'token' or 'disabled', got '$AUTH'"
}

resolve_state() {
    [[ "$1" == up ]] && mkdir -p "$STATE_IN"
    if [[ -d "$STATE_IN" ]]; then
        STATE="$(cd "$STATE_IN" && pwd)"
    elif [[ "$STATE_IN" == /* ]]; then
        STATE="$STATE_IN"
    else
        STATE="$PWD/$STATE_IN"
    fi
    LOGS="$STATE/logs"
    TOKEN_FILE="$STATE/auth_token"
    ENV_FILE="$STATE/env.sh"
    SETTINGS_FILE="$STATE/settings"
    if [[ -f "$STATE/ray_tmpdir" ]]; then
        RAY_TMP="$(cat "$STATE/ray_tmpdir")"   # what `up` chose; down/status must agree
    elif [[ -n "${PASSRAY_RAY_TMPDIR:-}" ]]; then
        RAY_TMP="$PASSRAY_RAY_TMPDIR"
    elif (( ${#STATE} <= 48 )); then
        RAY_TMP="$STATE/ray"
    else
        RAY_TMP="/tmp/passray-$(id -u)-$RAY_PORT"
    fi
}

# --- processes -------------------------------------------------------------------------
# Runs "$@" as the leader of a new session and writes the session id to $1's file.
# --wait: wait for the command (ray start returns once its daemons run);
# --detach: leave it running (mlflow server). Ray's daemons and workers stay in the
# session of the `ray start` that spawned them, which is how `down` finds them.
spawn_session() {
    local mode="$1" sidfile="$2"
    shift 2
    "$PY" -c '
import os, sys
mode, sidfile, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
pid = os.fork()
if pid == 0:
    os.setsid()
    with open(sidfile, "w") as f:
        f.write(str(os.getpid()))
    os.execvp(argv[0], argv)
if mode == "--wait":
    _, status = os.waitpid(pid, 0)
    sys.exit(os.waitstatus_to_exitcode(status))
' "$mode" "$sidfile" "$@"
}

# Pids of session $1 and all their descendants, but only if some process of that session
# mentions $2 (a path only our processes carry), so a stale id never hits a stranger.
session_pids() {
    local sid="$1" marker="$2"
    ps -eo pid=,ppid=,sid=,stat=,args= 2>/dev/null | awk -v sid="$sid" -v mark="$marker" '
        $4 ~ /^Z/ { next }  # zombies are already dead; init reaps them
        { pid = $1; parent[pid] = $2
          if ($3 == sid) { keep[pid] = 1; if (index($0, mark) > 0) ours = 1 } }
        END {
            if (!ours) exit
            do { grown = 0
                 for (p in parent) if (!(p in keep) && (parent[p] in keep)) { keep[p] = 1; grown = 1 }
            } while (grown)
            for (p in keep) print p
        }'
}

component_marker() {
    case "$1" in
        head | node2) printf '%s' "$RAY_TMP/$1" ;;
        mlflow) printf '%s' "$STATE/mlflow.db" ;;
    esac
}

component_pids() {
    local sidfile="$STATE/$1.sid"
    [[ -s "$sidfile" ]] || return 0
    session_pids "$(cat "$sidfile")" "$(component_marker "$1")"
}

component_alive() {
    [[ -n "$(component_pids "$1")" ]]
}

# Pids of one shutdown phase of a component: `raylet` (the raylet binary), `nogcs`
# (everything but the GCS), `leader` (the session leader), `all`.
phase_pids() {
    local name="$1" phase="$2" pids
    pids="$(component_pids "$name" | paste -sd, -)"
    [[ -n "$pids" ]] || return 0
    case "$phase" in
        all) tr ',' '\n' <<<"$pids" ;;
        leader) tr ',' '\n' <<<"$pids" | grep -x "$(cat "$STATE/$name.sid")" || true ;;
        raylet) ps -o pid=,args= -p "$pids" | awk 'index($0, "/raylet/raylet") { print $1 }' ;;
        nogcs) ps -o pid=,args= -p "$pids" | awk '!index($0, "/gcs/gcs_server") { print $1 }' ;;
    esac
}

# Stops a component in the order `ray stop` uses (raylet, then the rest, the GCS last):
# SIGTERM'd all at once, Ray's GCS, monitor and agents wait on each other for seconds.
stop_component() {
    local name="$1" pids phase phases deadline started=$SECONDS
    pids="$(phase_pids "$name" all | tr '\n' ' ')"
    if [[ -z "${pids// /}" ]]; then
        rm -f "$STATE/$name.sid"
        return 0
    fi
    log "stopping $name (pids: ${pids% })"
    case "$name" in
        mlflow) phases=(leader all) ;;
        *) phases=(raylet nogcs all) ;;
    esac
    for phase in "${phases[@]}"; do
        pids="$(phase_pids "$name" "$phase" | tr '\n' ' ')"
        [[ -n "${pids// /}" ]] || continue
        # shellcheck disable=SC2086
        kill -TERM $pids 2>/dev/null || true
        deadline=$((SECONDS + STOP_GRACE))
        while (( SECONDS < deadline )); do
            pids="$(phase_pids "$name" "$phase" | tr '\n' ' ')"
            [[ -z "${pids// /}" ]] && break
            sleep 0.5
        done
    done
    pids="$(phase_pids "$name" all | tr '\n' ' ')"
    if [[ -n "${pids// /}" ]]; then
        log "$name: SIGKILL after SIGTERM: ${pids% }"
        # shellcheck disable=SC2086
        kill -KILL $pids 2>/dev/null || true
        sleep 1
        pids="$(phase_pids "$name" all | tr '\n' ' ')"
    fi
    if [[ -n "${pids// /}" ]]; then
        log "warning: $name still has processes: $pids"
        return 1
    fi
    rm -f "$STATE/$name.sid"
    log "$name stopped ($((SECONDS - started))s)"
}

# --- environment for every process we start and for the printed exports -----------
setup_auth_env() {
    unset RAY_AUTH_TOKEN  # would take precedence over RAY_AUTH_TOKEN_PATH
    if [[ "$AUTH" == token ]]; then
        if [[ ! -s "$TOKEN_FILE" ]]; then
            (umask 077 && "$PY" -c 'import secrets; print(secrets.token_hex(32), end="")' >"$TOKEN_FILE")
        fi
        chmod 600 "$TOKEN_FILE"
        export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$TOKEN_FILE"
    else
        export RAY_AUTH_MODE=disabled
        unset RAY_AUTH_TOKEN_PATH
    fi
}

# RAY_ADDRESS is the GCS address, not the http one: `ray.init()` refuses an http
# RAY_ADDRESS ("Invalid Ray address ... HTTP address"), which would break every local
# script and test in the shell. The `ray job` CLI reads RAY_API_SERVER_ADDRESS first.
exports() {
    printf 'export RAY_ADDRESS=127.0.0.1:%s\n' "$RAY_PORT"
    printf 'export RAY_API_SERVER_ADDRESS=http://127.0.0.1:%s\n' "$DASH_PORT"
    printf 'export MLFLOW_TRACKING_URI=http://127.0.0.1:%s\n' "$MLFLOW_PORT"
    printf 'export RAY_AUTH_MODE=%s\n' "$AUTH"
    if [[ "$AUTH" == token ]]; then
        printf 'export RAY_AUTH_TOKEN_PATH=%s\n' "$TOKEN_FILE"
    fi
    printf 'unset RAY_AUTH_TOKEN\n'
}

# GET $1; 0 if it answers 200. Sends the Ray token when auth is on (the dashboard answers
# 401 without it). Python instead of curl: the venv always has it.
http_ok() {
    local header=""
    if [[ "$AUTH" == token && "$1" == *":$DASH_PORT/"* ]]; then
        header="Bearer $(cat "$TOKEN_FILE")"
    fi
    "$PY" - "$1" "$header" <<'EOF' >/dev/null 2>&1
import sys, urllib.request
req = urllib.request.Request(sys.argv[1])
if sys.argv[2]:
    req.add_header("Authorization", sys.argv[2])
with urllib.request.urlopen(req, timeout=3) as resp:
    sys.exit(0 if resp.status == 200 else 1)
EOF
}

# Number of ALIVE nodes, from the dashboard's state API.
alive_nodes() {
    local header=""
    [[ "$AUTH" == token ]] && header="Bearer $(cat "$TOKEN_FILE")"
    "$PY" - "http://127.0.0.1:$DASH_PORT/api/v0/nodes?limit=100" "$header" <<'EOF' 2>/dev/null || echo 0
import json, sys, urllib.request
req = urllib.request.Request(sys.argv[1])
if sys.argv[2]:
    req.add_header("Authorization", sys.argv[2])
with urllib.request.urlopen(req, timeout=5) as resp:
    body = json.load(resp)
rows = body["data"]["result"]["result"]
print(sum(1 for row in rows if row.get("state") == "ALIVE"))
EOF
}

wait_for() {  # wait_for WHAT LOGFILE CMD...
    local what="$1" logfile="$2" deadline=$((SECONDS + UP_TIMEOUT))
    shift 2
    until "$@"; do
        if (( SECONDS >= deadline )); then
            log "$what did not come up within ${UP_TIMEOUT}s; last lines of $logfile:"
            tail -n 20 "$logfile" >&2 || true
            return 1
        fi
        sleep 1
    done
}

two_nodes_alive() { [[ "$(alive_nodes)" -ge 2 ]]; }

# --- commands ------------------------------------------------------------------------------
# Ports and auth mode of the running cluster, so that `status` and a repeated `up` agree
# with the `up` that started it whatever the caller's environment says now.
save_settings() {
    printf 'RAY_PORT=%s\nDASH_PORT=%s\nMLFLOW_PORT=%s\nAUTH=%s\n' \
        "$RAY_PORT" "$DASH_PORT" "$MLFLOW_PORT" "$AUTH" >"$SETTINGS_FILE"
}

load_settings() {
    local key value
    [[ -f "$SETTINGS_FILE" ]] || return 0
    while IFS='=' read -r key value; do
        case "$key" in
            RAY_PORT | DASH_PORT | MLFLOW_PORT | AUTH) printf -v "$key" '%s' "$value" ;;
        esac
    done <"$SETTINGS_FILE"
}

cmd_up() {
    if component_alive head || component_alive node2 || component_alive mlflow; then
        load_settings
        if component_alive head && component_alive node2 && component_alive mlflow; then
            log "already up (state: $STATE)"
            exports
            return 0
        fi
        die "partly up (state: $STATE); run '$0 down' first"
    fi
    command -v ray >/dev/null || die "ray not found; activate the venv or create $REPO_ROOT/.venv"
    command -v mlflow >/dev/null || die "mlflow not found; pip install mlflow"
    [[ -n "$PY" ]] || die "python not found"

    mkdir -p "$LOGS" "$RAY_TMP"
    printf '%s' "$RAY_TMP" >"$STATE/ray_tmpdir"
    save_settings
    setup_auth_env
    unset RAY_ADDRESS RAY_API_SERVER_ADDRESS
    # mlflow first: its start-up (schema creation, workers) overlaps with Ray's.
    log "starting mlflow server on 127.0.0.1:$MLFLOW_PORT"
    mkdir -p "$STATE/artifacts"
    # MLflow 3's server also starts a job runner with ~7 huey worker processes (GenAI
    # jobs passray does not use): too much for a laptop or a 2-core box.
    MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}" \
        spawn_session --detach "$STATE/mlflow.sid" mlflow server \
        --backend-store-uri "sqlite:///$STATE/mlflow.db" \
        --artifacts-destination "$STATE/artifacts" --serve-artifacts \
        --host 127.0.0.1 --port "$MLFLOW_PORT" --workers "$MLFLOW_WORKERS" \
        </dev/null >>"$LOGS/mlflow.log" 2>&1

    # Inherited by the raylets and thus by every worker and job driver they start.
    export MLFLOW_TRACKING_URI="http://127.0.0.1:$MLFLOW_PORT"

    local object_store=$((OBJECT_STORE_MB * 1024 * 1024))
    local gpu_flag=()
    [[ -n "$HEAD_GPUS" ]] && gpu_flag=(--num-gpus "$HEAD_GPUS")

    log "starting Ray head on 127.0.0.1:$RAY_PORT (dashboard :$DASH_PORT, auth: $AUTH)"
    if ! spawn_session --wait "$STATE/head.sid" ray start --head \
        --port "$RAY_PORT" \
        --dashboard-host 127.0.0.1 --dashboard-port "$DASH_PORT" \
        --dashboard-agent-listen-port "$AGENT_PORT" \
        --ray-client-server-port "$CLIENT_PORT" \
        --num-cpus "$HEAD_CPUS" "${gpu_flag[@]}" --object-store-memory "$object_store" \
        --temp-dir "$RAY_TMP/head" --disable-usage-stats \
        </dev/null >>"$LOGS/head.log" 2>&1; then
        log "ray start --head failed; last lines of $LOGS/head.log:"
        tail -n 20 "$LOGS/head.log" >&2
        cmd_down >/dev/null 2>&1 || true
        exit 1
    fi
    wait_for "Ray dashboard" "$LOGS/head.log" \
        http_ok "http://127.0.0.1:$DASH_PORT/api/version" || { cmd_down || true; exit 1; }

    log "starting node2 ($NODE2_CPUS CPUs, resource node2=1)"
    if ! spawn_session --wait "$STATE/node2.sid" ray start --address "127.0.0.1:$RAY_PORT" \
        --dashboard-agent-listen-port "$((AGENT_PORT + 1))" \
        --num-cpus "$NODE2_CPUS" --num-gpus "$NODE2_GPUS" --resources '{"node2": 1}' \
        --object-store-memory "$object_store" \
        --temp-dir "$RAY_TMP/node2" --disable-usage-stats \
        </dev/null >>"$LOGS/node2.log" 2>&1; then
        log "ray start (node2) failed; last lines of $LOGS/node2.log:"
        tail -n 20 "$LOGS/node2.log" >&2
        cmd_down >/dev/null 2>&1 || true
        exit 1
    fi
    wait_for "second Ray node" "$LOGS/node2.log" two_nodes_alive || { cmd_down || true; exit 1; }

    wait_for "mlflow server" "$LOGS/mlflow.log" \
        http_ok "http://127.0.0.1:$MLFLOW_PORT/health" || { cmd_down || true; exit 1; }

    exports >"$ENV_FILE"
    log "up: 2 Ray nodes, dashboard http://127.0.0.1:$DASH_PORT, mlflow http://127.0.0.1:$MLFLOW_PORT"
    log "logs: $LOGS and $RAY_TMP; env also in $ENV_FILE"
    exports
}

cmd_down() {
    local failed=0 name
    # mlflow first (cheap), then the worker node, then the head that owns the GCS.
    for name in mlflow node2 head; do
        stop_component "$name" || failed=1
    done
    if (( failed )); then
        die "some processes survived; see above"
    fi
    rm -f "$ENV_FILE" "$STATE/ray_tmpdir" "$SETTINGS_FILE"
    log "down (state kept in $STATE)"
}

cmd_status() {
    local name up=0 total=0 nodes
    load_settings
    for name in head node2 mlflow; do
        total=$((total + 1))
        if component_alive "$name"; then
            up=$((up + 1))
            printf '%-7s running (session %s)\n' "$name" "$(cat "$STATE/$name.sid")"
        else
            printf '%-7s stopped\n' "$name"
        fi
    done
    if component_alive head; then
        if [[ "$AUTH" == disabled || -s "$TOKEN_FILE" ]]; then setup_auth_env; fi
        nodes="$(alive_nodes)"
        printf 'ray     %s alive node(s), dashboard http://127.0.0.1:%s\n' "$nodes" "$DASH_PORT"
        ray status --address "127.0.0.1:$RAY_PORT" 2>/dev/null || true
    fi
    if component_alive mlflow; then
        if http_ok "http://127.0.0.1:$MLFLOW_PORT/health"; then
            printf 'mlflow  healthy at http://127.0.0.1:%s\n' "$MLFLOW_PORT"
        else
            printf 'mlflow  process alive but /health does not answer\n'
        fi
    fi
    (( up == total ))
}

main() {
    local cmd="${1:-}"
    case "$cmd" in
        up | down | status) ;;
        -h | --help | help) usage; exit 0 ;;
        *) usage >&2; exit 2 ;;
    esac
    check_settings
    resolve_state "$cmd"
    case "$cmd" in
        up) cmd_up ;;
        down) cmd_down ;;
        status) cmd_status || exit 3 ;;
    esac
}

main "$@"
