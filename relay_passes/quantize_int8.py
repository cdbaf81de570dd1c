"""QuantizeInt8Conv2d: conv2d chains (+ bias/residual/ReLU) whose input has a calibrated range -> the int8
sparse direct conv2d (te_ops_int8): input quantised to uint8 quads inside the kernel's pad stage, weights
as int8 quads (int8_rows), int32 accumulation, the dequantising epilogue fused.

Runs before SparsifyConv2d, so the layers it takes never reach the fp32 passes; layers without a range
(or with a conv it cannot take) are left to them. Every layer it takes is int8 whatever its sparsity:
the quad rows of a dense layer are simply full.
"""

from __future__ import annotations

import os
from functools import partial

import numpy as np
import tvm
from tvm import relax
from tvm.ir import IRModule
from tvm.target import Target

from unsparse_tvm.ops import names
from unsparse_tvm.ops import sparse_int8 as int8_ops
from unsparse_tvm.ops import sparse_int8_gathered as gathered_ops
from unsparse_tvm.ops.formats import compact_offsets, interleave_rows, inverse_order
from unsparse_tvm.ops.int8_formats import ActQuant, conv_quad_rows, epilogue_consts, quantize_weight, record_int8
from unsparse_tvm.schedules import cpu_vector_lanes
from unsparse_tvm.schedules.sparse_conv2d_int8_cpu import interleave_tile
from unsparse_tvm.schedules.x86_int8 import act_qmax, int8_kind

from . import _gathered_int8, _paired_int8, _quad_inputs, sparsify_conv2d
from ._int8_left_fp32 import capped_convs, fed_fp32, max_pool_input
from ._conv_match import ConvChainRewriter, conv_geometry, strided_pointwise, unsupported_reason
from ._util import const_array, fused_label, mark, shape_of
from .layers import LayerDecision, LayerNames

OP = names.SPARSE_CONV2D_INT8
CHAIN_UINT8 = True  # int8 convs feeding int8 convs exchange uint8 (tests turn it off to compare)
CHAIN_SHARED = True  # an output several int8 convs read (and nothing else) goes uint8 too
CHAIN_RESIDUALS = True  # llvm: block outputs that only int8 convs and their residual adds read go uint8 too
INTERLEAVE = True  # llvm: quad rows stored by register tiles (formats.interleave_rows); tests turn it off
NARROW_ROWS = True  # llvm, AVX-512: a stride-1 8x8 map in rows of 8 lanes (ConvGeometry.with_row_domain)
WIDE_OUTPUTS = True  # llvm: a chained output only a relaying conv reads is written in the producer's flat domain
FORMAT = "int8q4"  # the report's format column: int8 weight quads (ELL rows)
GATHERED = True  # llvm with VNNI and VBMI, or AVX2: layers whose quads hold few nonzeros run gathered quads
GATHERED_FORMAT = "int8g4"  # (_gathered_int8, ops.sparse_int8_gathered; design.md item 38)
INTO_PLANES = True  # a gathered padded-planes layer writes uint8 into the next one's planes (design.md item 40)
PACKS = True  # llvm without VNNI: requantise by vcvtps2dq and saturating packs (ActQuant.packs; design.md item 67)
# llvm without VNNI (AVX2's vpmaddubsw): a conv whose quads would hold under 2 nonzeros stays fp32; there its int8
# ran 0.49-0.95x the fp32 kernel (vgg16-cifar unstructured 90%: 2.25 against 1.80 ms end to end). A linear layer
# so on every CPU (quantize_int8_dense). The test suite turns it off (UNSPARSE_INT8_EVERY_LAYER=1: its int8 tests
# use scattered weights on every host)
SCATTERED_FP32 = os.environ.get("UNSPARSE_INT8_EVERY_LAYER") != "1"
# A conv followed by a ReLU6 (clip(0, M)) or a SiLU stays fp32: the int8 epilogue requantises after a plain ReLU
# only, so in int8 the activation ran as an op of its own and the fp32 passes' fusions were lost (mobilenet_v2's
# expand conv on its depthwise's planes: 0.083 ms fp32, 0.256 int8 + 0.120 for its ReLU6). UNSPARSE_INT8_EVERY_LAYER=1
# turns this off too (the suite's int8 tests put ReLU6s after int8 convs)
CAPPED_FP32 = SCATTERED_FP32
# llvm with VNNI: a conv whose quads would hold under 2 nonzeros, that the gathered kernel does not take and whose
# input no int8 conv writes (it would quantise an fp32 input) stays fp32 too: mobile networks' project convs after
# their fp32 depthwise (mobilenet_v2@224 unstructured 90%, ms, fp32 -> int8 quads: 16x20 on 112x112 0.047 -> 0.100,
# 24x88 on 56x56 0.049 -> 0.105; resnet50's quads on 56x56, fed uint8 by the int8 conv before them, ran faster
# than fp32: 64x256 0.274 -> 0.153)
FED_FP32 = SCATTERED_FP32


@relax.expr_functor.mutator
class _Int8Rewriter(ConvChainRewriter):
    allow_act = False  # the int8 epilogue requantises after a plain ReLU; a ReLU6 or SiLU stays its own op
    kind = "llvm"  # the target kind (Int8LayerPass sets it)
    lanes = 16  # and the int8 kernel's vector lanes
    gather = 0  # and the lanes it runs gathered_conv in (16: AVX-512 VNNI and VBMI, 8: AVX2; 0: none)
    saturating = False  # and whether it converts and narrows in one instruction each (ActQuant.saturating)
    packs = False  # and whether it narrows by saturating packs (ActQuant.packs)
    pmadd = False  # and whether its int8 is AVX2's (no VNNI: SCATTERED_FP32)
    capped: dict = {}  # plan(): the convs a ReLU6 or SiLU follows (CAPPED_FP32), never mutated
    fed_fp32: frozenset | set = frozenset()  # plan(): scattered quads on an fp32 input (FED_FP32)
    def __init__(self, mod: IRModule, ranges: dict, names: LayerNames, report: list, qmax: int):
        super().__init__(mod)
        self.ranges, self.names, self.report, self.qmax = ranges, names, report, qmax

    def act_of(self, conv, weight, geo) -> tuple[str, ActQuant] | None:
        """(layer name, input quantisation) of a conv this pass takes, else None."""
        name = self.names.known(weight)
        if name is None or name not in self.ranges or geo is None or unsupported_reason(conv, weight) is not None:
            return None
        if name in self.capped:
            self.names.capped_int8[name] = self.capped[name]
            return None
        # (the fill first: quads that fill never stay fp32, and need no gathered geometry worked out)
        if SCATTERED_FP32 and (fill := _gathered_int8.quad_fill(weight)) < _gathered_int8.MAX_FILL and \
                ((self.pmadd and self.gathered_geometry(weight, geo) is None) or name in self.fed_fp32):
            self.names.fp32_int8[name] = round(fill, 3)
            return None
        return name, ActQuant.from_range(*self.ranges[name], self.qmax, self.saturating, self.packs)

    def plan(self, func: relax.Function) -> None:
        """The conv chains (ConvChainRewriter.plan), and which of them feed int8 convs only (one, possibly
        through one max pool, or several in one quantisation): those write uint8 in the consumers'
        quantisation (`self.out_act`), which then skips quantising. Max pool commutes with the monotone
        rounding, so the network computes exactly what it computes without chaining, on a quarter of the
        bytes. On llvm, block outputs that int8 convs read and int8 chains add as residuals go uint8 too
        (_uint8_residuals, `self.res_act`: a quantised residual, so not bit-exact), and outputs that one
        relaying conv reads are written wide (_wide_outputs, `self.wide`)."""
        super().plan(func)
        self.out_act, self.res_act, self.wide, self.dead, self.planes = {}, {}, {}, set(), {}
        self.pairs = {}
        self.capped = capped_convs(self, func) if CAPPED_FP32 else {}
        self.fed_fp32 = fed_fp32(self) if FED_FP32 and self.gather else frozenset()
        if not CHAIN_UINT8:
            return
        var2val, counts = self.var2val, self.counts
        readers: dict = {}  # input var -> (conv, quantisation) of the int8 convs reading it
        for conv, _ in self.plans.values():
            weight = const_array(conv.args[1])
            consumer = self.act_of(conv, weight, conv_geometry(conv, weight))
            if consumer is not None and isinstance(conv.args[0], relax.Var):
                readers.setdefault(conv.args[0], []).append((conv, consumer[1]))
        for src, convs in readers.items():
            acts = [a for _, a in convs]
            # every use an int8 conv, all in one quantisation (they read one tensor, so one calibrated range):
            # several where a stage begins, resnet's conv1 and downsample reading the pooled stem or the last
            # block's output (3.2 MB of fp32 at 56x56, written, then read and quantised twice)
            shared = len(acts) > 1
            if counts.get(src, 0) != len(acts) or any(a != acts[0] for a in acts) or (shared and not CHAIN_SHARED):
                continue
            # through a max pool too (resnet's stem): with nearbyint vectorised (ops.sparse_int8) the stem's uint8
            # write-back costs what its fp32 one did, and the pool, the relay and both readers run on bytes
            pooled = max_pool_input(src, var2val, counts)
            if pooled is not None:
                src = pooled
                if not isinstance(src, relax.Var) or counts.get(src, 0) != 1:
                    continue
            producer = self.plans.get(src)
            if producer is not None:
                pconv = producer[0]
                pweight = const_array(pconv.args[1])
                if self.act_of(pconv, pweight, conv_geometry(pconv, pweight)) is not None:
                    self.out_act[src] = acts[0]
        self.wide = _wide_outputs(self, readers) if WIDE_OUTPUTS and self.kind == "llvm" else {}
        self.res_act = _uint8_residuals(self) if CHAIN_RESIDUALS and self.kind == "llvm" else {}
        self.out_act.update(self.res_act)
        # a chain whose residual is now uint8: its absorbed fp32 add is dead, and re-emitted it would not type
        self.dead = {v for _, ep in self.plans.values() if ep.residual in self.res_act for v in ep.absorbed}
        # nor would a conv reading a wide output (3-D) as re-emitted on the way to its chain's end
        self.dead |= {v for c, ep in self.plans.values() if c.args[0] in self.wide for v in ep.absorbed}
        # or the padded planes a gathered producer wrote (2-D)
        self.planes = _gathered_int8.into_planes(self, readers) if INTO_PLANES and GATHERED and self.gather else {}
        self.dead |= {v for c, ep in self.plans.values() if c.args[0] in self.planes for v in ep.absorbed}
        # a residual conv paired with the conv adding it (_paired_int8) is emitted by that conv's rewrite
        self.pairs = _paired_int8.plan(self) if _paired_int8.PAIRED and self.kind == "llvm" else {}
        self.dead |= set(self.pairs.values())

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        if binding.var not in self.dead:
            super().visit_var_binding_(binding)

    def kernel_geometry(self, geo):
        """(the conv as the int8 kernel runs it, the (sy, sx) its pad stage reads the input at); the planning
        (_wide_outputs) and the rewrite both ask here."""
        if self.kind != "llvm":
            return geo, (1, 1)
        # a strided 1x1 (resnet's downsamples) as the stride-1 conv on every s-th input position, which the
        # pad stage reads in place: one phase plane quantised instead of s*s
        run = strided_pointwise(geo)
        if run is not None:
            return run, geo.stride
        # a strided conv whose output rows are whole vectors (resnet's stem: 112 of its phase planes' 115):
        # computed over the output map itself, read at pitch Wq (ConvGeometry.with_row_domain), the epilogue
        # in the write-back (resnet50 95% channel4: 7.30 -> 7.13 ms). Not at stride 1: vgg16-cifar's 32- and
        # 16-wide 3x3s ran 1.5-1.7x slower so (0.59 -> 0.66 ms in all; not understood). But an 8x8 map under
        # AVX-512 in rows of 8 lanes, as the fp32 kernel runs it: 8 half-width vpdpbusd per quad where the
        # padded plane took 5 full ones (vgg16-cifar channel4 90%: 0.590 -> 0.532 ms one thread, 0.360 ->
        # 0.329 two). A stride-1 4x4 map: its input as patches (ConvGeometry.with_patches), one aligned
        # 64-byte load per weight quad where the padded plane took three unaligned 8-lane loads
        if tuple(geo.stride) != (1, 1):
            return geo.with_row_domain(self.lanes), (1, 1)
        if NARROW_ROWS and 2 * geo.ow == self.lanes == 16:
            return geo.with_row_domain(self.lanes, narrow=True), (1, 1)
        return geo.with_patches(self.lanes), (1, 1)

    def gathered_geometry(self, weight: np.ndarray, geo):
        """The geometry a gathered kernel runs the conv at, or None where it keeps its quads."""
        if not (GATHERED and self.gather and geo is not None):
            return None
        return _gathered_int8.geometry(weight, geo, self.gather)

    def rewrite(self, conv, weight, geo, ep):
        taken = self.act_of(conv, weight, geo)
        if taken is None:
            return None
        name, act = taken
        out_act = self.out_act.get(ep.last)
        res_act = self.res_act.get(ep.residual) if isinstance(ep.residual, relax.Var) else None
        paired = self.rewrite_pair(conv, weight, geo, ep, name, act, out_act) if ep.last in self.pairs else None
        if paired is not None:
            return paired
        ggeo = self.gathered_geometry(weight, geo) if ep.last not in self.wide else None
        if ggeo is not None:
            return self.rewrite_gathered(conv, weight, geo, ggeo, ep, name, act, out_act, res_act)
        run, sub = self.kernel_geometry(geo)
        wq, wscale = quantize_weight(weight)
        rows = conv_quad_rows(wq, run)
        comp, out_scale = epilogue_consts(wq, wscale, act)
        extra, flags = self.epilogue_args(ep)
        op = partial(int8_ops.sparse_conv2d_int8, geo=run, act=act, quads=rows.pad_quads, out_act=out_act,
                     subsample=sub, res_act=res_act,
                     wide=ep.last in self.wide, **flags)
        # llvm: each row's length in a last column (TrimRowLoops ends the kernel's loop there), uint16 where
        # a layer's offsets fit
        off = compact_offsets(rows.off_with_lengths()) if self.kind == "llvm" else rows.off
        x = self.visit_expr(conv.args[0])
        if self.kind == "llvm":  # a relay's byte shuffle where the pad stage would write byte by byte
            x = _quad_inputs.conv_input(self.builder_, x, geo, run, sub, act, rows.pad_quads,
                                        self.wide.get(conv.args[0], 0), self.lanes, self.gather == gathered_ops.LANES)
        tile = interleave_tile(geo.k, run.q_extent, self.lanes, run.ow if run.row_domain else 0) \
            if self.kind == "llvm" and INTERLEAVE else 0
        # small maps: quad rows sorted by length, as SparsifyConv2d sorts fp32 rows; not a wide output (its
        # epilogue is the accumulators' write-back, which an index read would take apart)
        data = rows.data
        order = None if ep.last in self.wide else sparsify_conv2d.sorted_rows(data, tile, run.oh * run.ow)
        if order is not None:  # comp and out_scale stay in output-channel order: the epilogue indexes them by k
            data, off = data[order], off[order]
            extra.append(relax.const(inverse_order(order)))
        if tile > 1:  # a row tile's quads side by side (formats.interleave_rows), as SparsifyConv2d stores fp32 rows
            data, off = interleave_rows(data, tile), interleave_rows(off, tile)
        args = [x] + [relax.const(a) for a in (data, off, comp, out_scale)]
        call = self.builder_.call_te(partial(op, has_row_order=order is not None), *args, *extra,
                                     primfunc_name_hint=OP)
        pad_shape = [rows.pad_quads, *run.pad_shape[1:]]  # a plane's rows, or (patches) the patches' rows
        mark(self.builder_, call, {"op": OP, "unsparse.fmt": FORMAT, "unsparse.pad_shape": pad_shape,
                                   **({"unsparse.row_domain": run.ow} if run.row_domain else {}),
                                   **({"unsparse.patches": 1} if run.patches else {}),
                                   **({"unsparse.interleave": tile} if tile > 1 else {}),
                                   **({names.ROW_ORDER: 1} if order is not None else {}),
                                   **({names.ROW_LENGTHS: 1} if self.kind == "llvm" else {})})
        fused = _int8_fused(ep, out_act, res_act)
        self.report.append(int8_decision(name, "conv2d", weight, rows, [geo.n, geo.c, geo.h, geo.w], fused,
                                         (comp, out_scale), off))
        return call


    def rewrite_pair(self, conv, weight, geo, ep, name, act, out_act):
        """The layer and its residual conv as one kernel (_paired_int8), their report rows; else None, the
        residual conv emitted on its own first (its binding was left out for the pair)."""
        res = self.pairs.pop(ep.last)
        made = _paired_int8.emit(self, conv, weight, geo, ep, act, out_act)
        pconv, pep = self.plans[res]
        if made is None:
            pweight = const_array(pconv.args[1])
            alone = self.rewrite(pconv, pweight, conv_geometry(pconv, pweight), pep)
            self.set_var_remap(res, self.builder_.emit(alone))
            return None
        call, (pname, pweight, pgeo, prows, pconsts), (rows, consts) = made
        self.report.append(int8_decision(pname, "conv2d", pweight, prows, [pgeo.n, pgeo.c, pgeo.h, pgeo.w],
                                         _int8_fused(pep, None, None) + f" (paired with {name})", pconsts))
        fused = _int8_fused(ep, out_act, None).replace("residual", "residual(paired)")
        self.report.append(int8_decision(name, "conv2d", weight, rows, [geo.n, geo.c, geo.h, geo.w], fused, consts))
        return call

    def rewrite_gathered(self, conv, weight, geo, run, ep, name, act, out_act, res_act):
        """The layer as gathered quads (relay_passes._gathered_int8), its report row."""
        call, rows, consts = _gathered_int8.emit(self, conv, weight, geo, run, ep, act, out_act, res_act)
        fused = _int8_fused(ep, out_act, res_act)
        self.report.append(int8_decision(name, "conv2d", weight, rows, [geo.n, geo.c, geo.h, geo.w], fused,
                                         consts, rows.off, fmt=GATHERED_FORMAT))
        return call


def _wide_outputs(rw: _Int8Rewriter, readers: dict) -> dict:
    """Chained outputs (uint8, one int8 conv reading them) that the consumer's quad_relay can read in the
    producer's flat domain, thrown-away columns included: the producer writes [N, K, q_extent] from its
    accumulators (sparse_conv2d_int8's `wide`) instead of running an epilogue pass over int32 sums written
    out and read back (resnet's 3x3s, whose rows carry 2 padding columns). {var: row pitch Wq}."""
    out = {}
    for src in rw.out_act:
        convs = readers.get(src, [])
        producer = rw.plans.get(src)
        if len(convs) != 1 or producer is None or producer[1].residual is not None:
            continue
        pconv, cconv = producer[0], convs[0][0]
        pgeo, cgeo = (conv_geometry(c, const_array(c.args[1])) for c in (pconv, cconv))
        if pgeo is None or cgeo is None or any(rw.gathered_geometry(const_array(c.args[1]), g) is not None
                                               for c, g in ((pconv, pgeo), (cconv, cgeo))):
            continue
        prun, psub = rw.kernel_geometry(pgeo)
        # a producer whose pad stage quantised fp32 (vgg's first conv before QUANTIZE_FIRST) ran its wide
        # write-back 2.7x slower than conv + epilogue pass (LLVM gathered the accumulators back from a stack
        # buffer; not understood): it keeps its pass. Quantised first, it runs wide like any (0.021 -> 0.016 ms)
        src_in = pconv.args[0]
        if (src_in not in rw.out_act and max_pool_input(src_in, rw.var2val, rw.counts) not in rw.out_act
                and not _quad_inputs.quantized_first(prun, pgeo, psub, shape_of(src_in))):
            continue
        if not prun.flat_output and _quad_inputs.relays(rw.kernel_geometry(cgeo)[0], cgeo):  # flat: in the write-back
            out[src] = prun.wq
    return out


def _uint8_residuals(rw: _Int8Rewriter) -> dict:
    """ResNet's block outputs: a conv chain's output that int8 convs read (the next block's first conv, a
    downsample) and int8 chains add as their residual, and nothing else reads. Those write uint8 in the
    readers' quantisation (one calibrated range: the convs read the same tensor), and the chains adding them
    dequantise it in their epilogue: a quarter of the bytes written, quantised and added, and the next conv's
    pad stage relays bytes instead of quantising floats. Unlike conv -> conv chaining this changes the result:
    the residual path is quantised as ONNX Runtime's QDQ models quantise an Add's inputs. {var: ActQuant}."""
    convs_by_input: dict = {}   # input var -> acts of the int8 chains reading it
    residual_users: dict = {}   # var -> int8 chains adding it as their residual
    for conv, ep in rw.plans.values():
        weight = const_array(conv.args[1])
        taken = rw.act_of(conv, weight, conv_geometry(conv, weight))
        if taken is None:
            continue
        if isinstance(conv.args[0], relax.Var):
            convs_by_input.setdefault(conv.args[0], []).append(taken[1])
        if isinstance(ep.residual, relax.Var):
            residual_users[ep.residual] = residual_users.get(ep.residual, 0) + 1
    out = {}
    for src, acts in convs_by_input.items():
        producer = rw.plans.get(src)
        if producer is None or src not in residual_users or src in rw.out_act:
            continue
        pconv = producer[0]
        pweight = const_array(pconv.args[1])
        same = all(a == acts[0] for a in acts)
        if same and rw.counts.get(src, 0) == len(acts) + residual_users[src] \
                and rw.act_of(pconv, pweight, conv_geometry(pconv, pweight)) is not None:
            out[src] = acts[0]
    return out


def _int8_fused(ep, out_act: ActQuant | None, res_act: ActQuant | None) -> str:
    """The report's fused column of an int8 conv: its epilogue, "+requant" where it writes uint8, and a uint8
    residual marked so."""
    fused = fused_label(ep) + ("+requant" if out_act is not None else "")
    return fused.replace("residual", "residual(uint8)") if res_act is not None else fused


def int8_decision(name: str, kind: str, weight: np.ndarray, rows, input_shape: list, fused: str,
                  consts: tuple, off: np.ndarray | None = None, fmt: str = FORMAT) -> LayerDecision:
    """The report's row for a layer run int8 (its quads, their offsets as stored, the bytes its consts take)."""
    sparsity = float((weight == 0).sum()) / weight.size
    decision = LayerDecision(name, kind, list(weight.shape), round(sparsity, 4), "sparse", fmt, rows.nnz,
                             rows.padded_size, input_shape, fused)
    record_int8(decision, rows, *consts, off=off)
    return decision


class Int8LayerPass:
    """Undecorated base of the int8 passes (decorated classes cannot be subclassed): the calibrated
    activation ranges and the target's activation range in, `rewriter` run over the module."""

    rewriter: type

    def __init__(self, ranges: dict, target: Target, names: LayerNames | None = None, report: list | None = None):
        self.ranges, self.qmax, self.kind = dict(ranges), act_qmax(target), target.kind.name
        self.lanes = cpu_vector_lanes(target)[0] if self.kind == "llvm" else 0  # the int8 kernel's vector
        self.gather = gathered_ops.gather_lanes(target)
        self.pmadd = self.kind == "llvm" and int8_kind(target) == "pmadd"
        self.saturating = self.kind == "llvm" and not self.pmadd  # VNNI (AVX-512): vcvtps2dq, vpmovusdb
        self.packs = PACKS and self.pmadd  # no VNNI (AVX2): vcvtps2dq, packusdw + packuswb (ActQuant.packs)
        self.names = names if names is not None else LayerNames()
        self.report = report if report is not None else []

    def transform_module(self, mod: IRModule, _ctx: tvm.transform.PassContext) -> IRModule:
        rewriter = self.rewriter(mod, self.ranges, self.names, self.report, self.qmax)
        rewriter.kind, rewriter.lanes, rewriter.gather, rewriter.pmadd = self.kind, self.lanes, self.gather, self.pmadd
        rewriter.saturating, rewriter.packs = self.saturating, self.packs
        return rewriter.run(mod)


@tvm.transform.module_pass(opt_level=0, name="QuantizeInt8Conv2d")
class QuantizeInt8Conv2d(Int8LayerPass):
    """Replace calibrated conv2d chains by the int8 sparse direct conv2d (llvm: VNNI/AVX2, cuda: dp4a)."""

    rewriter = _Int8Rewriter
