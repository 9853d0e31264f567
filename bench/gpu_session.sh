#!/usr/bin/env bash
# Every GPU check in one command of under 9 minutes, for when GPU time is short (15 minutes, start included):
# install peft-quant over the machine's own CUDA builds of torch and Triton, run the kernel tests on CUDA, then time
# every kernel and the whole training steps (bench/triton_kernels.py). Each step has its own time limit, so a hang in one
# still leaves the logs of the others. Logs go to $OUT (or /tmp/peft-quant-gpu).
#
# Usage, from the repository root on the GPU machine:  bash bench/gpu_session.sh
# A machine without peft >= 0.21 or bitsandbytes gets them from wheels in .whl/ (git-ignored; about 42 MB), fetched
# where there is an index, for the GPU machine's Python (3.12 on the H200 machines this was written for):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_24_x86_64 -d .whl peft==0.21.2 bitsandbytes==0.50.2
# and copied to the GPU machine with the tree. Only peft-quant itself is installed (--no-deps):
# torch, Triton and transformers stay the machine's. The CPU benches (bench/qoft.py, quant_full.py, stash.py,
# timestep_scale.py) measure memory and quality on CPU and take longer than that; they are not run here.
set -uo pipefail
out=${OUT:-/tmp/peft-quant-gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
start=$(date +%s)
step() { echo "== $1 ($(( $(date +%s) - start )) s)"; }

step "install"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . 2>&1 | tail -3
{
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
    python3 -c "import torch, triton, peft, transformers, bitsandbytes, peft_quant, setuptools
for module in (torch, triton, peft, transformers, bitsandbytes, setuptools):
    print(module.__name__, module.__version__)
print('cuda', torch.version.cuda)"
} 2>&1 | tee "$out/env.txt"

step "kernel tests on CUDA"
# Each test shape JIT-compiles its own kernel specializations (about a second each): spread them over processes.
parallel=()
python3 -c "import xdist" 2>/dev/null && parallel=(-n 8)
timeout 240 python3 -m pytest -q -p no:cacheprovider "${parallel[@]}" tests/test_kernels_qoft.py \
    tests/test_kernels_quant_full.py tests/test_kernels_timestep_scale.py tests/test_kernels_stash.py 2>&1 \
    | tee "$out/kernel_tests.log" | tail -25

step "bench/triton_kernels.py"
timeout 300 python3 bench/triton_kernels.py 2>&1 | tee "$out/bench_kernels.md"

step "done"
