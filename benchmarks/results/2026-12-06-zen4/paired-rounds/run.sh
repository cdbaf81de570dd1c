set -x
cd /work/main
U=.venv/bin/unsparse-tvm
P="--peers onnxruntime,openvino --threads 1,2 --repeat 15 --no-layers --force"
for i in 1 2 3; do $U bench vgg16-cifar --sparsity 0.9 $P --json /tmp/b/s2/vgg-$i.json; done
UNSPARSE_MCPU=haswell $U bench vgg16-cifar --sparsity 0.9 $P --peer-isa auto --json /tmp/b/s2/vgg-avx2.json
for i in 1 2; do $U bench /tmp/q/vggc4q.pt2 --threads 1,2 --repeat 15 --no-layers --force --json /tmp/b/s2/vggc4q-$i.json; done
$U prune resnet50 --method channel4 --sparsity 0.95 -o /tmp/q/r50c4.pt2 --force
$U quantize /tmp/q/r50c4.pt2 --activations int8 --dataset random -o /tmp/q/r50c4q.pt2 --force
$U bench /tmp/q/r50c4q.pt2 --threads 1,2 --repeat 7 --no-layers --force --json /tmp/b/s2/r50c4q.json
