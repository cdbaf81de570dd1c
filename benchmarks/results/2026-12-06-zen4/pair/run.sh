#!/bin/sh
# issue 25 benches after the rounding bias and the paired residual convs (2026-12-06, 21:20- UTC, Zen 4)
set -x
U=.venv/bin/unsparse-tvm
D=benchmarks/results/2026-12-06-zen4/pair
$U bench /tmp/q/vggc4q.pt2 --peers onnxruntime_int8,openvino_int8 --threads 1,2 --repeat 15 --no-layers --json $D/vgg16-cifar-c4-int8.json --force > $D/vgg16-cifar-c4-int8.log 2>&1
$U bench /tmp/q/r50c4q.pt2 --peers onnxruntime_int8,openvino_int8 --threads 1,2 --repeat 9 --no-layers --json $D/resnet50-95-c4-int8.json --force > $D/resnet50-95-c4-int8.log 2>&1
$U bench /tmp/q/r50c4-90q.pt2 --peers onnxruntime_int8,openvino_int8 --threads 1,2 --repeat 9 --no-layers --json $D/resnet50-90-c4-int8.json --force > $D/resnet50-90-c4-int8.log 2>&1
$U bench /tmp/q/vgg-u-q.pt2 --peers onnxruntime_int8,openvino_int8 --threads 1,2 --repeat 15 --no-layers --json $D/vgg16-cifar-unstructured-int8.json --force > $D/vgg16-cifar-unstructured-int8.log 2>&1
$U bench /tmp/q/vggc4q.pt2 --peers onnxruntime_int8,openvino_int8 --threads 1,2 --repeat 15 --no-layers --json $D/vgg16-cifar-c4-int8-run2.json --force > $D/vgg16-cifar-c4-int8-run2.log 2>&1
# again at 21:59 UTC, the VM calmer (resnet50 95% .so 4.14 ms in so_profile, 5.0 at 21:24)
$U bench /tmp/q/r50c4-90q.pt2 --peers onnxruntime_int8,openvino_int8 --threads 1,2 --repeat 9 --no-layers --json $D/resnet50-90-c4-int8-run2.json --force > $D/resnet50-90-c4-int8-run2.log 2>&1
$U bench /tmp/q/r50c4q.pt2 --peers onnxruntime_int8,openvino_int8 --threads 1,2 --repeat 9 --no-layers --json $D/resnet50-95-c4-int8-run2.json --force > $D/resnet50-95-c4-int8-run2.log 2>&1
