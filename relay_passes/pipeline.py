"""The whole Relax pipeline, in phases: TVM's own passes around ours."""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.backend.cpu_generic import pipeline as cpu_backend
from tvm.relax.backend.cuda import pipeline as cuda_backend
from tvm.s_tir import dlight as dl
from tvm.target import Target

from unsparse_tvm.schedules import cpu_vector_lanes, fallback_cpu, rules
from unsparse_tvm.schedules.row_extents import TrimRowLoops
from unsparse_tvm.schedules.small_loops import SerialSmallLoops
from unsparse_tvm.cost.model import BUILTIN, CostModel, X86Rates

from .apply_tuning_records import ApplyTuningRecords
from .canonical_clip import CanonicalizeClip
from .drop_dead_channels import DropDeadChannels
from .fast_sigmoid import FastSigmoid
from .vector_max_pool import VectorMaxPool
from .layers import LayerNames
from .fold_batchnorm import FoldBatchNormIntoConv
from .lower_dense_conv2d import LowerDenseConv2d
from .quantize_int8 import QuantizeInt8Conv2d
from .quantize_int8_dense import QuantizeInt8Dense
from .sparsify_conv2d import SparsifyConv2d
from .sparsify_dense import SparsifyDense
from .tag_grouped_conv import TagGroupedConv


def pipeline_phases(target: Target, *, threshold: float | None = None, sparse: bool = True,
                    names: LayerNames | None = None, report: list | None = None, fmt: str | None = None,
                    configs: dict | None = None, database=None, activations: dict | None = None,
                    quant: dict | None = None, rates: X86Rates | None = None,
                    depthwise_rule: bool = True) -> list[tuple[str, list]]:
    """The pipeline as named phases of passes (tests run a prefix of them). activations: calibrated
    input ranges per layer name (unsparse_quant.json's "activations" layers): those convs run int8;
    `quant`: the model's unsparse_quant.json (frontend.read_quantization), whose other sparse layers
    then run on quantised weights; `rates`: the x86 cost model's rates (default: the built-in ones; `compile`
    passes this CPU's calibration, unsparse_tvm.cost.calibration); `depthwise_rule=False` leaves TVM's
    depthwise/grouped convs to the generic fallback schedule (benchmarks/dw_layers.py measures the rule)."""
    names = names if names is not None else LayerNames()
    is_cpu = target.kind.name == "llvm"
    backend = cpu_backend if is_cpu else cuda_backend
    phases = []
    # Phase 1: clean the imported graph: constants folded, then batch norms into convs (both FoldBatchNormIntoConv),
    # clips that an importer wrote as TE max/min calls (ONNX's Clip) back to relax.clip for the epilogue matchers
    cleanup = [FoldBatchNormIntoConv(names), CanonicalizeClip()]
    if sparse:  # channels whose depthwise filters are all zero leave their blocks (the dense baseline keeps them)
        cleanup.append(DropDeadChannels(names, gather=is_cpu))
    phases.append(("cleanup", cleanup))
    # Phase 1b: int8 execution of the calibrated convs (before the fp32 substitution takes them)
    if activations:
        int8 = [QuantizeInt8Conv2d(activations, target, names, report)]
        if is_cpu:  # the int8 linear layer has an x86 rule only
            int8.append(QuantizeInt8Dense(activations, target, names, report))
        phases.append(("int8", int8))
    # Phase 2: our substitution: sparse layers become TE sparse operators, epilogues fused
    if sparse:
        # per layer: sparse where predicted faster than dense (threshold None), or sparsity >= threshold
        # formats (hyb's bar), costs and the flat domain's vectors (ConvGeometry.with_overlap) depend on the target
        cost = cost_model(target, rates)
        phases.append(("sparsify", [SparsifyConv2d(threshold, names, report, fmt, cost, quant),
                                    SparsifyDense(threshold, names, report, fmt, cost, quant)]))
    # Phase 3: dense convs become the direct-conv operator with our x86 / CUDA schedule
    # (llvm: sigmoid/SiLU on a polynomial exp that vectorises, instead of a libm call per lane; the stem's
    # 3x3/2 max pool as a vector kernel, instead of one scalar window per output)
    cpu_ops = [FastSigmoid(), VectorMaxPool(cpu_vector_lanes(target)[0])] if is_cpu else []
    phases.append(("lower_dense", [LowerDenseConv2d()] + cpu_ops))
    # Phase 4: TVM legalises and fuses everything else (our operators are opaque to FuseOps)
    phases.append(("legalize", [relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
                                relax.transform.FoldConstant(), relax.transform.FuseOps(),
                                relax.transform.FuseTIR()]))
    # Phase 5: schedules: tuning records first, then our hand-written rules, then the rest
    schedule = []
    if database is not None:  # MetaScheduleApplyDatabase, counting what it scheduled
        schedule.append(ApplyTuningRecords(database))
    if is_cpu and depthwise_rule:  # TVM's depthwise/grouped convs (and fused epilogues) get our rule, not the fallback
        schedule.append(TagGroupedConv())
    schedule.append(dl.ApplyDefaultSchedule(*rules(target.kind.name, configs)))  # schedules/: ours
    if is_cpu:  # the int8 convs' loops end at their rows' lengths (tuned or not); then the generic fallback
        # and parallel loops over little work run on one thread (a second one's launch costs more)
        schedule += [TrimRowLoops(), dl.ApplyDefaultSchedule(fallback_cpu.RULE), SerialSmallLoops()]
    else:
        schedule.append(dl.ApplyDefaultSchedule(dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(),
                                                dl.gpu.GeneralReduction(), dl.gpu.Fallback()))
    phases.append(("schedule", schedule))
    # Phase 6: TVM's lowering to the Relax VM
    phases.append(("lower", backend.dataflow_lower_passes(target) + backend.finalize_passes(target)))
    return phases


def cost_model(target: Target, rates: X86Rates | None = None) -> CostModel:
    """The cost model the sparsify passes ask for `target`: its kind, the x86 rates (default built-in) and the
    float32 lanes of its vector register (its flat domains' vectors)."""
    is_cpu = target.kind.name == "llvm"
    return CostModel(target.kind.name, rates or BUILTIN, cpu_vector_lanes(target)[0] if is_cpu else 16)


def build_pipeline(target: Target, *, database=None, stop_after: str | None = None, **kwargs) -> tvm.transform.Pass:
    """A module pass taking an imported Relax module to a VM-ready one for `target`
    (or, with stop_after, through the named phase only)."""
    passes = []
    for name, phase in pipeline_phases(target, database=database, **kwargs):
        passes += phase
        if name == stop_after:
            break
    return _with_target(tvm.transform.Sequential(passes, name="unsparse_pipeline"), target, database)


def _with_target(seq: tvm.transform.Pass, target: Target, database) -> tvm.transform.Pass:
    @tvm.transform.module_pass(opt_level=0, name="UnsparsePipeline")
    def _pipeline(mod: tvm.ir.IRModule, _ctx: tvm.transform.PassContext) -> tvm.ir.IRModule:
        with target:
            if database is not None:
                with database:
                    return seq(mod)
            return seq(mod)

    return _pipeline
