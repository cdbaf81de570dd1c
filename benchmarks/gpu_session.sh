#!/usr/bin/env bash
# One device call on a lent GPU machine (docs/gpu.md): the GPU kit's full run, then Nsight Compute on our
# kernels of vgg16 and resnet50 at 90%, batch 1, with what time is left. Run from the repository root with
# the kit carried (.gpukit) and $OUT set:
#   bash benchmarks/gpu_session.sh [LIMIT_S]      # LIMIT_S: the call's timeout (default 570)
# Writes $OUT/env.txt, run.log, gpu_kit_results.json, and (if ncu works there) ncu.log, prof.ncu-rep, ncu.csv.
set -u
LIMIT=${1:-570}
export PYTHONUNBUFFERED=1
{
  date -u +%FT%TZ
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.draw,temperature.gpu --format=csv
  python3 -c "import torch, numpy; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version(), 'numpy', numpy.__version__)"
  uname -r; nproc
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# the kit: new groups stop starting after the budget, the knob grids run last
python3 .gpukit/run.py "$OUT" --budget-s $((LIMIT - 190)) > "$OUT/run.log" 2>&1
echo "kit rc=$? after ${SECONDS}s" | tee -a "$OUT/env.txt"
tail -n 30 "$OUT/run.log"

# ncu: hardware counters for each default-knob kernel of the 90% batch-1 layers, launched once (--profile);
# --clock-control none: the card's clocks are left as found
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -n 1)
left=$((LIMIT - 25 - SECONDS))
echo "ncu=${NCU:-none} left=${left}s" | tee -a "$OUT/env.txt"
if [ -n "$NCU" ] && [ "$left" -gt 40 ]; then
  timeout -s INT "$left" "$NCU" --clock-control none --kernel-name-base function \
    -k 'regex:^(vgg16|resnet50)_s0p9_b1_default_l[0-9]+_v0' -c 80 \
    --section SpeedOfLight --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis \
    --section Occupancy --section LaunchStats -o "$OUT/prof" -f \
    python3 .gpukit/run.py "$OUT/ncu" --profile --only '^(vgg16|resnet50)_s0\.9_b1_default$' > "$OUT/ncu.log" 2>&1
  echo "ncu rc=$? after ${SECONDS}s" | tee -a "$OUT/env.txt"
  [ -f "$OUT/prof.ncu-rep" ] && timeout 20 "$NCU" --import "$OUT/prof.ncu-rep" --csv --page details > "$OUT/ncu.csv" 2>> "$OUT/ncu.log"
  tail -n 8 "$OUT/ncu.log"
fi
ls -la "$OUT"
