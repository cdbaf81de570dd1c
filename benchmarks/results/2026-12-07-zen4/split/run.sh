#!/bin/sh
# design.md item 56 (2026-12-07, Zen 4): the last session's code (34d7ba1, old-*.so) against this one's (new-*.so),
# one thread and two, AVX-512 and AVX2 code (UNSPARSE_MCPU=haswell at compile), three repetitions; then each
# module's tasks timed (benchmarks/parallel_tasks.py). Models as in docs/results.md (prune --method channel4
# --sparsity 0.95 / 0.9; vgg16-cifar channel4 0.9; quantize --activations int8 --dataset random).
D=benchmarks/results/2026-12-07-zen4/split
for rep in 1 2 3; do
  for m in r50c4q r50c4-90q vggc4q; do
    for t in 1 2; do
      for isa in "" -avx2; do
        TVM_NUM_THREADS=2 .venv/bin/python benchmarks/so_profile.py /tmp/q/old-$m$isa.so /tmp/q/new-$m$isa.so \
          --threads $t --rounds 21 > $D/so_profile-$m$isa-t$t-rep$rep.log 2>&1
      done
    done
  done
done
for m in r50c4q r50c4-90q; do
  for v in old new; do
    .venv/bin/python benchmarks/parallel_tasks.py /tmp/q/$v-$m.so --runs 60 > $D/parallel_tasks-$v-$m.log 2>&1
  done
done
# AVX2 code (UNSPARSE_MCPU=haswell) of this session's final commit is the last session's, instruction for
# instruction (objdump -d of both .so, md5 equal), so it is not timed here. vgg16-cifar's code is unchanged too
# (its maps are under MAP_SPLIT_POSITIONS): its rows above are the VM's noise between identical modules.
# Then the peers, 01:00- UTC:
U=.venv/bin/unsparse-tvm
$U bench /tmp/q/r50c4q.pt2 --peers onnxruntime_int8,openvino_int8 --threads 1,2 --repeat 9 --no-layers \
  --json $D/resnet50-95-c4-int8.json --force > $D/resnet50-95-c4-int8.log 2>&1
$U bench /tmp/q/r50c4-90q.pt2 --peers onnxruntime_int8,openvino_int8 --threads 1,2 --repeat 9 --no-layers \
  --json $D/resnet50-90-c4-int8.json --force > $D/resnet50-90-c4-int8.log 2>&1
