#!/usr/bin/env bash
# The SD1.5 benchmark on a lent GPU in one call of the device tool (issue 18), every finished measure
# written to OUT as it comes, so a call cut short keeps what it measured:
#
#     bash benchmarks/gpu.sh OUT [SECONDS]        # SECONDS: the whole budget of the call, default 540
#     SDJAX_BENCH_SIZE=tiny bash benchmarks/gpu.sh /tmp/gpu-dry 240     # the dry run on a CPU
#
# Carry .whl (diffusers and importlib_metadata, which the GPU image lacks; benchmarks/NOTES.md says how to
# download them). Writes OUT/bench.log (machine, versions, progress), OUT/RESULTS.md and OUT/raw.json (the
# in-process measures), OUT/RESULTS-processes.md and OUT/raw-processes.json (new processes: cold and warm
# compilation cache, peak memory at 1024² with and without the tiled VAE). `python benchmarks/bench.py
# --render OUT/raw.json` makes a report again from the raw results.
set -uo pipefail
out=${1:?usage: bash benchmarks/gpu.sh OUT [SECONDS]}
budget=${2:-540}
size=${SDJAX_BENCH_SIZE:-sd15}
start=$SECONDS
mkdir -p "$out"
log=$out/bench.log
python=${PYTHON:-python3}

if [ -d .whl ]; then
    $python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "installing .whl failed" >>"$log"; exit 1; }
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
left() { echo $((budget - (SECONDS - start))); }
mark() { echo "=== $1 at $((SECONDS - start)) s" >>"$log"; }

{
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit --format=csv
    $python -c "import jax, torch; print(jax.devices(), jax.devices()[0].client.platform_version, torch.__version__)"
} >>"$log" 2>&1

# 1. In one process, the most important first: sdjax (default attention) and diffusers eager on every
#    measure, then sdjax with XLA's attention on the UNet alone, then torch.compile. About 2/3 of the time.
mark "in-process measures, $(($(left) * 2 / 3)) s allowed"
timeout -k 10 $(($(left) * 2 / 3)) $python benchmarks/bench.py --size "$size" --no-processes --reps 5 --train-batch 16 \
    --attention auto,xla:unet_2+unet_16 --torch-compile default:txt2img_1+unet_2+unet_16+txt2img_8 \
    --out "$out/RESULTS.md" --raw "$out/raw.json" >>"$log" 2>&1
mark "in-process measures ended (exit $?)"

# 2. New processes: time to the first image with an empty and a warm compilation cache, then peak memory.
mark "new processes, $(($(left) - 10)) s allowed"
timeout -k 10 $(($(left) - 10)) $python benchmarks/bench.py --size "$size" --processes-only --large-sizes 1024x1024 \
    --tiled-vae --out "$out/RESULTS-processes.md" --raw "$out/raw-processes.json" >>"$log" 2>&1
mark "new processes ended (exit $?)"
