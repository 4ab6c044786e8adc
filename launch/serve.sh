#!/usr/bin/env bash
# Start the whole stack: vLLM (CPU build, default Qwen model) on 127.0.0.1:8000 and the
# gateway on 127.0.0.1:8080. Ctrl-C (or SIGTERM) stops both.
#
#   ./launch/serve.sh                         # the default model, built offline on first run
#   MODEL=/path/to/hf-folder ./launch/serve.sh
#   MODEL=Qwen/Qwen2.5-7B-Instruct ./launch/serve.sh     # needs a model hub or a local cache
#   UPSTREAMS=http://gpu-host:8000 ./launch/serve.sh      # vLLM runs elsewhere: gateway only
#
# If the vLLM started here exits on its own (a crash, the OOM killer), the gateway keeps
# running: it answers 503 with Retry-After meanwhile (a stream in flight ends with an in-band
# error event) while vLLM is started again after 2, 4, 8 ... up to 60 s (back to 2 s once a
# vLLM has been healthy for 2 minutes). If the gateway exits, everything stops and serve.sh
# exits non-zero.
#
# Other knobs: MAX_NUM_SEQS (vLLM's --max-num-seqs and the gateway's window; default 8),
# VLLM_PORT (8000), GATEWAY_PORT (8080), GATEWAY_TASKS (a task table), VLLM_EXTRA_ARGS,
# LOG_DIR (logs/). In LOG_DIR: vllm.log, gateway.log, and the running servers' PIDs,
# gateway.pid and vllm.pid (the vLLM API server, which leads its own process group with the
# engine; rewritten at every restart). Both PID files are removed when serve.sh stops.
set -euo pipefail
. "$(dirname "$0")/common.sh"

MODEL=${MODEL:-default}
MAX_NUM_SEQS=${MAX_NUM_SEQS:-8}
VLLM_PORT=${VLLM_PORT:-8000}
GATEWAY_PORT=${GATEWAY_PORT:-8080}
LOGS=${LOG_DIR:-$ROOT/logs}
mkdir -p "$LOGS"
LOGS=$(cd "$LOGS" && pwd)
SHOWN_LOGS=${LOGS#"$ROOT"/}   # logs/ in messages when it is the default
RESTART_MIN_S=2 RESTART_MAX_S=60 HEALTHY_RESETS_AFTER_S=120 CHECK_EVERY_S=5
VLLM_PID="" GATEWAY_PID="" TIMER_PID="" OWN_VLLM=""

cleanup() {
    local rc=$?
    trap - INT TERM EXIT
    set +e  # stop everything, whatever fails on the way
    if [ -n "$GATEWAY_PID$VLLM_PID" ]; then say "Stopping"; fi
    if [ -n "$TIMER_PID" ]; then kill "$TIMER_PID" 2>/dev/null; fi
    if [ -n "$GATEWAY_PID" ]; then kill -TERM "$GATEWAY_PID" 2>/dev/null; wait "$GATEWAY_PID" 2>/dev/null; fi
    if [ -n "$VLLM_PID" ]; then stop_group "$VLLM_PID"; fi
    rm -f "$LOGS/vllm.pid" "$LOGS/gateway.pid"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 0' INT TERM   # a stop asked for by the user is a clean exit

# launch_vllm: start vLLM in its own process group, log appended to vllm.log; sets VLLM_PID
launch_vllm() {
    # shellcheck disable=SC2086
    start_vllm "$model_arg" "$VLLM_PORT" "$MAX_NUM_SEQS" "$LOGS/vllm.log" ${VLLM_EXTRA_ARGS:-}
    echo "$VLLM_PID" >"$LOGS/vllm.pid"
}

# supervise: watch both servers. vLLM is started again after a back-off; the gateway exiting
# ends serve.sh. `wait -n` sleeps until a server exits or a timer ticks, and a trapped signal
# interrupts it at once, so Ctrl-C / SIGTERM stop everything even during a back-off. Who has
# exited is then asked with `kill -0`: `wait -n` never reports a child that bash already
# reaped during another command (it says "no such job"), e.g. while wait_http was running.
supervise() {
    local delay=$RESTART_MIN_S restart_at=0 healthy_since="" restarted="" tick timer status
    local announced="" warned="" started=$SECONDS
    while true; do
        # A plain `wait PID` gives an exited child's status, even one bash reaped already.
        if ! kill -0 "$GATEWAY_PID" 2>/dev/null; then
            status=0
            wait "$GATEWAY_PID" 2>/dev/null || status=$?
            gateway_exited "$status"
        fi
        if [ -n "$VLLM_PID" ] && ! kill -0 "$VLLM_PID" 2>/dev/null; then
            status=0
            wait "$VLLM_PID" 2>/dev/null || status=$?
            # Its engine processes outlive the API server, holding the port and memory, and
            # linger over 20 s after SIGTERM (measured): with nobody left to serve, 5 s is enough.
            stop_group "$VLLM_PID" 5
            VLLM_PID=""
            rm -f "$LOGS/vllm.pid"
            if [ -n "$healthy_since" ] && [ $((SECONDS - healthy_since)) -ge "$HEALTHY_RESETS_AFTER_S" ]; then
                delay=$RESTART_MIN_S
            fi
            healthy_since=""
            restart_at=$((SECONDS + delay))
            say "vLLM exited (code $status); restarting in $delay s, log: $SHOWN_LOGS/vllm.log"
            delay=$((delay * 2 > RESTART_MAX_S ? RESTART_MAX_S : delay * 2))
        fi
        if [ -z "$VLLM_PID" ] && [ "$SECONDS" -ge "$restart_at" ]; then
            printf '\n==== %s  serve.sh: restarting vLLM after it exited ====\n' "$(date -Is)" >>"$LOGS/vllm.log"
            launch_vllm
            say "Restarted vLLM (pid $VLLM_PID); the gateway answers 503 until it is ready"
            restarted=1
        fi
        if [ -n "$VLLM_PID" ] && [ -z "$healthy_since" ] \
            && curl -sf -m 2 -o /dev/null "http://127.0.0.1:$VLLM_PORT/health"; then
            healthy_since=$SECONDS
            if [ -n "$restarted" ]; then say "vLLM is serving again"; fi
        fi
        if [ -z "$announced" ] && curl -sf -m 2 -o /dev/null "http://127.0.0.1:$GATEWAY_PORT/ready"; then
            announce
            announced=1
        elif [ -z "$announced$warned" ] && [ $((SECONDS - started)) -ge 120 ]; then
            say "the gateway is not ready after 120 s; see $SHOWN_LOGS/gateway.log"
            warned=1
        fi
        tick=$CHECK_EVERY_S
        if [ -z "$VLLM_PID" ]; then tick=$((restart_at - SECONDS > 0 ? restart_at - SECONDS : 0)); fi
        if [ -z "$announced" ] && [ "$tick" -gt 1 ]; then tick=1; fi
        sleep "$tick" &
        TIMER_PID=$! timer=$!
        wait -n "$GATEWAY_PID" ${VLLM_PID:+"$VLLM_PID"} "$timer" 2>/dev/null || true
        kill "$timer" 2>/dev/null || true
        wait "$timer" 2>/dev/null || true
        TIMER_PID=""
    done
}

announce() {
    cat <<MSG

  qwen-gateway is ready:  http://127.0.0.1:$GATEWAY_PORT/v1   (tasks: GET /v1/models)

  curl -s http://127.0.0.1:$GATEWAY_PORT/v1/chat/completions -H 'Content-Type: application/json' \\
       -d '{"model": "sentiment", "messages": [{"role": "user", "content": "这家餐厅太好吃了"}]}'

  from openai import OpenAI
  client = OpenAI(base_url="http://127.0.0.1:$GATEWAY_PORT/v1", api_key="unused")
  client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "Hi!"}])

  Metrics: http://127.0.0.1:$GATEWAY_PORT/metrics    Press Ctrl-C to stop.

MSG
}

# gateway_exited STATUS: say so and end serve.sh with 1 (serving stopped unasked)
gateway_exited() {
    GATEWAY_PID=""
    say "the gateway exited on its own (code $1); stopping (log: $SHOWN_LOGS/gateway.log)"
    exit 1
}

ensure_gateway_venv
if [ -z "${UPSTREAMS:-}" ]; then
    OWN_VLLM=1
    ensure_vllm_venv
    model_arg=$(resolve_model "$MODEL")
    say "Starting vLLM on 127.0.0.1:$VLLM_PORT with $model_arg (log: $SHOWN_LOGS/vllm.log)"
    say "  first start compiles kernels (~70 s on 2 cores; cached for later starts)"
    : >"$LOGS/vllm.log"
    launch_vllm
    wait_http "http://127.0.0.1:$VLLM_PORT/health" 600 "vLLM" "$LOGS/vllm.log" "$VLLM_PID"
    UPSTREAMS="http://127.0.0.1:$VLLM_PORT"
fi

say "Starting the gateway on 127.0.0.1:$GATEWAY_PORT (upstreams: $UPSTREAMS; log: $SHOWN_LOGS/gateway.log)"
"$VENV/bin/python" -m gateway --host 127.0.0.1 --port "$GATEWAY_PORT" \
    --upstreams "$UPSTREAMS" --window "$MAX_NUM_SEQS" >>"$LOGS/gateway.log" 2>&1 &
GATEWAY_PID=$!
echo "$GATEWAY_PID" >"$LOGS/gateway.pid"
if [ -z "$OWN_VLLM" ]; then
    wait_http "http://127.0.0.1:$GATEWAY_PORT/ready" 120 "the gateway" "$LOGS/gateway.log" "$GATEWAY_PID"
    announce
    status=0
    wait "$GATEWAY_PID" || status=$?
    gateway_exited "$status"
fi
# The gateway's process is up; supervise says it is ready once /ready answers 200 (vLLM may
# die and be restarted meanwhile).
wait_http "http://127.0.0.1:$GATEWAY_PORT/health" 120 "the gateway" "$LOGS/gateway.log" "$GATEWAY_PID"
supervise
