#!/bin/bash
# The whole GPU-machine check in one command (run as root from the repository root):
#     bash bench/gpu_device.sh [CRIU_BUNDLE] [OUT_DIR] [GIB] [RUNS] [CYCLES]
# CRIU_BUNDLE is what bench/gpu_bundle.sh made (default .gpu; else `criu` in PATH).
# Writes env.txt (machine, driver, PyTorch, CRIU and `criu check`) into OUT_DIR
# (default $OUT, else /tmp/stasis-gpu-out), and for each of RUNS runs (default 1)
# of bench/gpu_check.py its output, JSON and the worker's and CRIU's logs into
# OUT_DIR/runs.tar.gz (runN/). The first run on a fresh virtual machine also pays
# the hypervisor's first touch of guest memory; later runs reuse memory the first
# one freed. OUT_DIR/results-gpu.json gathers the runs (bench/results-gpu.json's
# form, which bench/report.py renders into docs/performance.md).
# Each run does CYCLES checkpoint-kill-restore cycles (default 1); with
# CRIU_BUNDLE/plugins (CRIU's cuda_plugin) and NVIDIA's cuda-checkpoint in PATH, each
# is followed by one through the plugin, the reference.
# Exits 0 only when every run's restored tensor checksum matched.
set -u
bundle=${1:-.gpu}
out=${2:-${OUT:-/tmp/stasis-gpu-out}}
gib=${3:-4}
runs=${4:-1}
cycles=${5:-1}
export PATH=$PATH:/usr/local/cuda/bin
mkdir -p "$out"
if [ -x "$bundle/criu" ]; then criu=$(readlink -f "$bundle/criu"); else criu=$(command -v criu); fi
python=$(command -v python3)
plugins=
if [ -f "$bundle/plugins/cuda_plugin.so" ]; then plugins=$(readlink -f "$bundle/plugins"); fi
{
    echo "== $(date -u +%FT%TZ)"
    uname -a
    nvidia-smi --query-gpu=name,driver_version,memory.total,persistence_mode --format=csv
    "$python" --version
    "$python" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.is_available())'
    "$criu" --version
    echo "cuda-checkpoint: $(command -v cuda-checkpoint || echo none)"
    "$criu" check 2>&1 | tail -n 20
    echo "THP: $(cat /sys/kernel/mm/transparent_hugepage/enabled 2>/dev/null)"
    df -h /dev/shm /var/tmp | tail -n 2
    nproc; free -g | head -n 2
} >"$out/env.txt" 2>&1
cat "$out/env.txt"
set -o pipefail
rc=0
for i in $(seq 1 "$runs"); do
    mkdir -p "$out/run$i"
    echo "== run $i of $runs"
    PYTHONUNBUFFERED=1 timeout 400 "$python" bench/gpu_check.py --gib "$gib" --criu "$criu" \
        --cycles "$cycles" ${plugins:+--plugin "$plugins"} \
        --json "$out/run$i/gpu.json" --logs "$out/run$i" 2>&1 | tee "$out/run$i/check.txt" || rc=1
done
"$python" bench/gpu_check.py --collect "$out" --json "$out/results-gpu.json"
# One archive of the runs' files (the logs are large, and few files travel best).
tar -czf "$out/runs.tar.gz" -C "$out" $(cd "$out" && ls -d run*/) && rm -rf "$out"/run*/
exit $rc
