#!/usr/bin/env bash
# Run a benchmark. On a fresh machine it first sets up what the benchmark needs (the venvs,
# vLLM's CPU build, the model it uses, wrk); later runs reuse all of it.
#
#   ./launch/bench.sh slo [--quick | --repeats 2 | ...]    # vLLM alone vs the gateway, default model
#   ./launch/bench.sh overhead [--rounds 3 | ...]           # the gateway's own cost, wrk + a fake upstream
#   ./launch/bench.sh soak [--minutes 60 | ...]             # memory and FDs under mixed load, tiny model
#   ./launch/bench.sh soak --upstream fake                  # the same against a fast fake (no vLLM)
#   ./launch/bench.sh sim [--servers 1,4 | ...]             # GPU scale, SIMULATED vLLMs (no model)
#   ./launch/bench.sh affinity [--model tiny | ...]         # task-affinity vs least-loaded, two vLLMs
#
# Each prints its results and where it wrote them; `--help` after the name lists its options.
set -euo pipefail
. "$(dirname "$0")/common.sh"
cd "$ROOT"

name=${1:-}
[ -n "$name" ] || fail "choosing a benchmark" "name one: slo, overhead, soak, sim or affinity"
shift

ensure_gateway_venv
case $name in
    slo)
        ensure_vllm_venv
        ensure_model default "$DEFAULT_MODEL_DIR"
        export QWEN_GATEWAY_DEFAULT_MODEL="$DEFAULT_MODEL_DIR"
        ;;
    soak)
        case " $* " in
            *" --upstream fake "* | *" --upstream=fake "*) ;;  # no vLLM, no model
            *)
                ensure_vllm_venv
                ensure_model tiny "$TINY_MODEL_DIR"
                export QWEN_GATEWAY_TINY_MODEL="$TINY_MODEL_DIR"
                ;;
        esac
        ;;
    affinity) # two vLLM servers; the default model unless --model tiny (hit rate only)
        ensure_vllm_venv
        case " $* " in
            *" --model tiny "* | *" --model=tiny "*)
                ensure_model tiny "$TINY_MODEL_DIR"
                export QWEN_GATEWAY_TINY_MODEL="$TINY_MODEL_DIR"
                ;;
            *)
                ensure_model default "$DEFAULT_MODEL_DIR"
                export QWEN_GATEWAY_DEFAULT_MODEL="$DEFAULT_MODEL_DIR"
                ;;
        esac
        ;;
    overhead)
        command -v wrk >/dev/null || apt_install wrk
        case " $* " in *" --redis "*) command -v redis-server >/dev/null || apt_install redis-server ;; esac
        ;;
    sim) # simulated vLLMs in loadtest/: no vLLM, no model (loadtest/README-sim.md)
        exec "$VENV/bin/python" loadtest/sim_bench.py "$@"
        ;;
    *) fail "choosing a benchmark" "unknown benchmark '$name' (slo, overhead, soak, sim, affinity)" ;;
esac
exec "$VENV/bin/python" "loadtest/$name.py" "$@"
