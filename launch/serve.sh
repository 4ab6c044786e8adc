#!/usr/bin/env bash
# Start the whole stack: vLLM (CPU build, default Qwen model) on 127.0.0.1:8000 and the
# gateway on 127.0.0.1:8080. Ctrl-C (or SIGTERM) stops both.
#
#   ./launch/serve.sh                         # the default model, built offline on first run
#   MODEL=/path/to/hf-folder ./launch/serve.sh
#   MODEL=Qwen/Qwen2.5-7B-Instruct ./launch/serve.sh     # needs a model hub or a local cache
#   UPSTREAMS=http://gpu-host:8000 ./launch/serve.sh      # vLLM runs elsewhere: gateway only
#
# Other knobs: MAX_NUM_SEQS (vLLM's --max-num-seqs and the gateway's window; default 8),
# VLLM_PORT (8000), GATEWAY_PORT (8080), GATEWAY_TASKS (a task table), VLLM_EXTRA_ARGS.
set -euo pipefail
. "$(dirname "$0")/common.sh"

MODEL=${MODEL:-default}
MAX_NUM_SEQS=${MAX_NUM_SEQS:-8}
VLLM_PORT=${VLLM_PORT:-8000}
GATEWAY_PORT=${GATEWAY_PORT:-8080}
LOGS="$ROOT/logs"
mkdir -p "$LOGS"
VLLM_PID="" GATEWAY_PID=""

cleanup() {
    local rc=$?
    trap - INT TERM EXIT
    if [ -n "$GATEWAY_PID$VLLM_PID" ]; then say "Stopping"; fi
    if [ -n "$GATEWAY_PID" ]; then kill -TERM "$GATEWAY_PID" 2>/dev/null; wait "$GATEWAY_PID" 2>/dev/null; fi
    if [ -n "$VLLM_PID" ]; then stop_group "$VLLM_PID"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 0' INT TERM   # a stop asked for by the user is a clean exit

ensure_gateway_venv
if [ -z "${UPSTREAMS:-}" ]; then
    ensure_vllm_venv
    model_arg=$(resolve_model "$MODEL")
    say "Starting vLLM on 127.0.0.1:$VLLM_PORT with $model_arg (log: logs/vllm.log)"
    say "  first start compiles kernels (~70 s on 2 cores; cached for later starts)"
    # shellcheck disable=SC2086
    start_vllm "$model_arg" "$VLLM_PORT" "$MAX_NUM_SEQS" "$LOGS/vllm.log" ${VLLM_EXTRA_ARGS:-}
    wait_http "http://127.0.0.1:$VLLM_PORT/health" 600 "vLLM" "$LOGS/vllm.log" "$VLLM_PID"
    UPSTREAMS="http://127.0.0.1:$VLLM_PORT"
fi

say "Starting the gateway on 127.0.0.1:$GATEWAY_PORT (upstreams: $UPSTREAMS; log: logs/gateway.log)"
"$VENV/bin/python" -m gateway --host 127.0.0.1 --port "$GATEWAY_PORT" \
    --upstreams "$UPSTREAMS" --window "$MAX_NUM_SEQS" >>"$LOGS/gateway.log" 2>&1 &
GATEWAY_PID=$!
wait_http "http://127.0.0.1:$GATEWAY_PORT/ready" 120 "the gateway" "$LOGS/gateway.log" "$GATEWAY_PID"

cat <<MSG

  qwen-gateway is ready:  http://127.0.0.1:$GATEWAY_PORT/v1   (tasks: GET /v1/models)

  curl -s http://127.0.0.1:$GATEWAY_PORT/v1/chat/completions -H 'Content-Type: application/json' \\
       -d '{"model": "sentiment", "messages": [{"role": "user", "content": "这家餐厅太好吃了"}]}'

  from openai import OpenAI
  client = OpenAI(base_url="http://127.0.0.1:$GATEWAY_PORT/v1", api_key="unused")
  client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "Hi!"}])

  Metrics: http://127.0.0.1:$GATEWAY_PORT/metrics    Press Ctrl-C to stop.

MSG
# Wait for either process to exit; then stop the other one too.
wait -n ${VLLM_PID:+"$VLLM_PID"} "$GATEWAY_PID" || true
say "a server exited on its own; see logs/"
