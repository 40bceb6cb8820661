#!/usr/bin/env bash
# One prepared run for a session lent a GPU machine (issue 22's numbers; a lease is 15 minutes):
# the GPU tests (the compiled Triton kernels, the staged in-training merge), then the in-memory
# merge on the GPU, the in-training merge streamed through it, and the file merge on the host's
# cores. Each step has its own time limit; the steps run in order of what matters most.
#
#     bash benchmarks/device_session.sh      # from the repository root, on the GPU machine
#
# Logs and JSON land in $OUT (the device tool's folder), else ./device_session/. Needs python3
# with torch (CUDA), triton, numba, lightning, transformers, safetensors and psutil: the device
# image has them (no jsonargparse or datasets needed here). Worst case 560 s (9.3 minutes).
set -uo pipefail
out=${OUT:-device_session}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

step() {  # step NAME SECONDS COMMAND...: run it under a time limit, its output in NAME.log
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s): $*"
    timeout "$limit" "$@" 2>&1 | tee "$out/$name.log"
    echo "== $name: exit ${PIPESTATUS[0]}"
}

step machine 20 bash -c 'nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv;
    echo "cpus: $(nproc)"; python3 -c "import torch, triton, numba;
print(torch.__version__, torch.version.cuda, triton.__version__, numba.__version__)"'
# only the tests that need the GPU (CI runs the rest, the interpreted kernels included), and
# no -x: one failure must not hide the others
step tests 170 python3 -m pytest -q -p no:cacheprovider -k gpu \
    tests/test_triton_kernels.py tests/test_device_stream.py
step device 120 python3 benchmarks/merge_device_bench.py --device cuda --kernels both \
    --check-cpu --json "$out/device.json"
step stream 120 python3 benchmarks/device_merge_stream_bench.py --json "$out/stream.json"
# issue 22's file-merge goals: the average against the read (and write) floor, selection and
# resample(4) against the average; the fused kernels only, so three rounds fit the limit
step files 130 python3 benchmarks/merge_bench.py --no-mergekit --total-gb 4 --repeats 3 \
    --workdir /tmp/selmerge_bench --json "$out/files.json"
