#!/usr/bin/env bash
# Start one vLLM OpenAI server the way the gateway expects it. Every launcher (serve.sh, the
# test fixtures, compose's CPU profile) goes through here, so the flags live in one place.
#
#   launch/vllm.sh MODEL PORT MAX_NUM_SEQS [extra vLLM args...]
#
# MODEL is a folder or a hub id. MAX_NUM_SEQS must equal the gateway's --window for that
# upstream. Environment: VLLM_CPU_KVCACHE_SPACE (GiB, whole numbers; default 2),
# MAX_MODEL_LEN (default 4096), VLLM_HOST (default 127.0.0.1), SERVED_MODEL_NAME (default: the
# folder's name for a folder, else the hub id; responses carry it, never a path).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
model=$1 port=$2 seqs=$3
shift 3
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} TRANSFORMERS_OFFLINE=${TRANSFORMERS_OFFLINE:-1}
export VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-2}
if [[ -d $model ]]; then name=$(basename "$model"); else name=$model; fi
# `vllm serve` fails for the vllm-cpu distribution (PackageNotFoundError), so run the module.
# Without --scheduling-policy priority vLLM ignores or rejects the priority field: keep it.
# Function calling as vLLM's tool-calling docs give it for Qwen2.5 (hermes-style <tool_call>).
exec "${VLLM_PYTHON:-$ROOT/.venv-vllm/bin/python}" -m vllm.entrypoints.openai.api_server \
    --model "$model" \
    --host "${VLLM_HOST:-127.0.0.1}" --port "$port" \
    --scheduling-policy priority \
    --enable-prefix-caching \
    --max-num-seqs "$seqs" \
    --max-model-len "${MAX_MODEL_LEN:-4096}" \
    --served-model-name "${SERVED_MODEL_NAME:-$name}" \
    --enable-auto-tool-choice --tool-call-parser hermes \
    "$@"
