#!/usr/bin/env bash
# Run every test tier. On a fresh machine it first sets up what the tiers need (the gateway's
# venv, vLLM's CPU build, the tiny and the default model, Debian tools for the observability
# tests); later runs reuse all of it. The exit code is the verdict.
#
#   ./launch/test.sh                 # static checks, unit, integration, end to end
#   ./launch/test.sh unit            # just one tier: static | unit | integration | e2e
set -euo pipefail
. "$(dirname "$0")/common.sh"
cd "$ROOT"

tiers=${*:-static unit integration e2e}
started=$SECONDS

ensure_gateway_venv
case " $tiers " in *" unit "* | *" integration "*) ensure_system_packages ;; esac
case " $tiers " in *" integration "* | *" e2e "*)
    ensure_vllm_venv
    ensure_model tiny "$TINY_MODEL_DIR"
    ;;
esac
case " $tiers " in *" e2e "*) ensure_model default "$DEFAULT_MODEL_DIR" ;; esac
export QWEN_GATEWAY_TINY_MODEL="$TINY_MODEL_DIR" QWEN_GATEWAY_DEFAULT_MODEL="$DEFAULT_MODEL_DIR"
mkdir -p "$ROOT/test-output"

pytest() { "$VENV/bin/python" -m pytest -p no:cacheprovider "$@"; }

for tier in $tiers; do
    case $tier in
        static)
            say "Static checks: ruff and mypy (strict)"
            "$VENV/bin/ruff" check gateway tests loadtest launch
            "$VENV/bin/ruff" format --check gateway tests loadtest launch
            "$VENV/bin/mypy" gateway
            ;;
        unit)
            say "Unit tier: in-process, fake upstream"
            pytest tests/unit -q
            ;;
        integration)
            say "Integration tier: real vLLM (CPU build) on the tiny Qwen2 model"
            pytest tests/integration -q -x
            ;;
        e2e)
            say "End-to-end tier: real vLLM on Qwen2.5-Coder-0.5B-Instruct"
            pytest tests/e2e -q -x -s
            ;;
        *) fail "choosing a tier" "unknown tier '$tier' (static, unit, integration, e2e)" ;;
    esac
done
say "All tiers passed ($tiers) in $((SECONDS - started)) s"
