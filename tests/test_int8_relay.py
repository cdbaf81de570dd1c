"""uint8 inputs into quads by a byte shuffle (ops.quad_relay), and outputs that several int8 convs read
travelling as uint8 (relay_passes/quantize_int8.py, CHAIN_SHARED): the same bytes, so the same result."""

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn as nn

from conftest import compile_int8, int8_ready


def _record_calls(monkeypatch, module, name: str, pick=lambda a: a) -> list:
    """Calls of module.name from now on, each as pick(its arguments), the real function still run."""
    calls, real = [], getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **kw: calls.append(pick(a)) or real(*a, **kw))
    return calls


@pytest.mark.parametrize("n,c,h,w,k,stride,pad,zp", [
    (1, 8, 16, 16, 1, 1, (0, 0, 0, 0), 0),     # a 1x1: one 16-position step per row
    (2, 12, 9, 18, 1, 1, (0, 0, 0, 0), 128),   # batch 2, rows of 18: the second step shifted back
    (1, 8, 33, 34, 1, 2, (0, 0, 0, 0), 3),     # a strided 1x1's input: every other row and column
    (2, 8, 17, 16, 3, 1, (1, 1, 1, 1), 128),   # a padded 3x3: zero-point borders, a trailing quad
    (1, 12, 7, 20, 3, 1, (0, 2, 1, 0), 7),     # asymmetric padding
    (1, 8, 14, 14, 1, 1, (0, 0, 0, 0), 5),     # rows under 16 positions: a 1x1's plane relayed as one row
    (2, 12, 7, 7, 1, 1, (0, 0, 0, 0), 128),    # 49 positions: three steps and one shifted back
    # every map in two parts (parts=2, as map_parts asks for 56x56 maps and up); larger ones: a flat plane's steps ...
    (2, 8, 45, 50, 1, 1, (0, 0, 0, 0), 3),
    (1, 8, 64, 64, 1, 1, (0, 0, 0, 0), 0),
    # ... and a padded plane's rows (odd count, asymmetric padding, a trailing quad, batch 2)
    (2, 12, 47, 46, 3, 1, (2, 1, 0, 1), 128),
])
def test_quad_relay_is_the_pad_stage(n, c, h, w, k, stride, pad, zp, llvm):
    """The relay writes what the int8 conv's pad stage writes for a uint8 input (TE, built on its own)."""
    import tvm
    from tvm import te

    from unsparse_tvm.ops.geometry import ConvGeometry
    from unsparse_tvm.ops.int8_formats import ActQuant, pad_quads
    from unsparse_tvm.ops.quad_relay import quad_relay
    from unsparse_tvm.ops.sparse_int8 import pad_quantize
    from unsparse_tvm.relay_passes._conv_match import strided_pointwise

    geo = ConvGeometry(n, c, h, w, 4, k, k, (stride, stride), pad, (1, 1))
    run = strided_pointwise(geo) if stride > 1 else geo
    sub = (stride, stride) if stride > 1 else (1, 1)
    quads, act = pad_quads(run), ActQuant(0.1, zp, 255)
    x = np.random.default_rng(c + w).integers(0, 256, (n, c, h, w)).astype(np.uint8)
    xt = te.placeholder((n, c, h, w), "uint8", name="x")
    want_mod = tvm.compile(te.create_prim_func([xt, pad_quantize(xt, run, act, quads, sub)]), target=llvm)
    got_mod = tvm.compile(tvm.IRModule({"main": quad_relay(x.shape, run, quads, zp, sub, parts=2).with_attr(
        "global_symbol", "main")}), target=llvm)
    shape = (n, quads * run.channel_plane, 4)
    want, got = (tvm.runtime.tensor(np.full(shape, 99, np.uint8)) for _ in range(2))
    want_mod["main"](tvm.runtime.tensor(x), want)
    got_mod["main"](tvm.runtime.tensor(x), got)
    assert quads > c // 4 or k == 1  # the padded cases cover trailing quads
    np.testing.assert_array_equal(got.numpy(), want.numpy())


@pytest.mark.parametrize("n,c,h,w,stride,pad,zp", [
    (1, 8, 56, 56, 2, (1, 1, 1, 1), 128),   # resnet's 3x3/2 on 56x56: steps of 16, one phase loads a byte early
    (2, 12, 28, 28, 2, (1, 1, 1, 1), 3),    # batch 2, 14-wide phase planes: steps of 8, a trailing quad
    (1, 8, 33, 40, 2, (1, 1, 1, 1), 7),     # odd rows, a last step shifted back
    (1, 8, 56, 56, 2, (0, 1, 2, 0), 5),     # asymmetric padding
    (1, 16, 20, 70, 2, (1, 1, 1, 1), 0),    # rows of three steps, four channel quads
    (2, 8, 14, 14, 2, (1, 1, 1, 1), 11),    # 7-wide phase planes (resnet's 3x3/2 on 14x14): steps of 4
])
def test_quad_relay_strided_is_the_pad_stage(n, c, h, w, stride, pad, zp, llvm):
    """The strided relay writes the phase planes the int8 conv's pad stage writes for a uint8 input."""
    import tvm
    from tvm import te

    from unsparse_tvm.ops.geometry import ConvGeometry
    from unsparse_tvm.ops.int8_formats import ActQuant, pad_quads
    from unsparse_tvm.ops.quad_relay import quad_relay_strided
    from unsparse_tvm.ops.sparse_int8 import pad_quantize

    geo = ConvGeometry(n, c, h, w, 4, 3, 3, (stride, stride), pad, (1, 1))
    quads, act = pad_quads(geo), ActQuant(0.1, zp, 255)
    x = np.random.default_rng(c + w).integers(0, 256, (n, c, h, w)).astype(np.uint8)
    xt = te.placeholder((n, c, h, w), "uint8", name="x")
    want_mod = tvm.compile(te.create_prim_func([xt, pad_quantize(xt, geo, act, quads)]), target=llvm)
    relay = quad_relay_strided(x.shape, geo, quads, zp)
    got_mod = tvm.compile(tvm.IRModule({"main": relay.with_attr("global_symbol", "main")}), target=llvm)
    shape = (n, quads * geo.channel_plane, 4)
    want, got = (tvm.runtime.tensor(np.full(shape, 99, np.uint8)) for _ in range(2))
    want_mod["main"](tvm.runtime.tensor(x), want)
    got_mod["main"](tvm.runtime.tensor(x), got)
    np.testing.assert_array_equal(got.numpy(), want.numpy())


@pytest.mark.parametrize("n,c,k,pad,dilation,zp", [
    (1, 8, 3, (1, 1, 1, 1), 1, 128),    # vgg16-cifar's 3x3s on 4x4, zero-point borders
    (2, 12, 3, (1, 1, 1, 1), 1, 0),     # batch 2, a trailing quad (12 channels in 4 quads)
    (1, 8, 3, (2, 2, 2, 2), 2, 7),      # dilation 2
    (1, 8, 5, (2, 2, 2, 2), 1, 3),      # a 5x5: 25 taps
])
def test_quad_relay_patches_is_the_pad_stage(n, c, k, pad, dilation, zp, llvm):
    """The patches relay writes the patches the int8 conv's pad stages write (a padded plane, cut per tap) for a
    uint8 4x4 input. Built for AVX-512 VBMI (its byte permute) on any host, run where this CPU has it."""
    import tvm
    from tvm import te

    from conftest import cpu_target
    from unsparse_tvm.ops.geometry import ConvGeometry
    from unsparse_tvm.ops.int8_formats import ActQuant, pad_quads
    from unsparse_tvm.ops.quad_relay import patch_picks, quad_relay_patches, relays_patches
    from unsparse_tvm.ops.sparse_int8 import _quad_patches, pad_quantize
    from unsparse_tvm.testing.isa import skip_unless_runs_here

    geo = ConvGeometry(n, c, 4, 4, 8, k, k, (1, 1), pad, (dilation, dilation))
    run = geo.with_patches(16)
    assert run.patches and relays_patches((n, c, 4, 4), run)
    quads, act = pad_quads(run), ActQuant(0.1, zp, 255)
    x = np.random.default_rng(c + k).integers(0, 256, (n, c, 4, 4)).astype(np.uint8)
    xt = te.placeholder((n, c, 4, 4), "uint8", name="x")
    plane = pad_quantize(xt, dataclasses.replace(run, patches=False), act, quads)
    want_mod = tvm.compile(te.create_prim_func([xt, _quad_patches(plane, run)]), target=llvm)
    vbmi = cpu_target("icelake-server")
    got_mod = tvm.compile(tvm.IRModule({"main": quad_relay_patches(x.shape, run, quads, zp).with_attr(
        "global_symbol", "main")}), target=vbmi)
    assert "vpermt2b" in got_mod.mod.inspect_source("asm") or "vpermi2b" in got_mod.mod.inspect_source("asm")
    skip_unless_runs_here(vbmi)
    shape = (n, quads * run.channel_plane, 4)
    want, got = (tvm.runtime.tensor(np.full(shape, 99, np.uint8)) for _ in range(2))
    want_mod["main"](tvm.runtime.tensor(x), want)
    got_mod["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(patch_picks(run, 4, 4)), got)
    np.testing.assert_array_equal(got.numpy(), want.numpy())


def test_4x4_layers_take_their_patches_from_the_relay(monkeypatch):
    """On a VBMI target the int8 3x3s on a 4x4 map whose input is an int8 layer's uint8 output take their patches
    from quad_relay_patches; the outputs are bit for bit those of the kernels' own pad stages (the switch off)."""
    import unsparse_tvm.ops.quad_relay as relay_ops
    from conftest import cpu_target
    from unsparse_tvm.testing.isa import skip_unless_runs_here

    monkeypatch.setattr("unsparse_tvm.relay_passes.quantize_int8.GATHERED", False)  # quads on any target
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(16, 12, 3, padding=2, dilation=2), nn.ReLU(), nn.Flatten(),
                          nn.Linear(12 * 16, 5)).eval()
    shape, target = (2, 8, 4, 4), cpu_target("icelake-server")
    ranges = int8_ready(model, shape, 0.6)
    calls = _record_calls(monkeypatch, relay_ops, "quad_relay_patches", lambda a: tuple(a[0]))
    report, run = compile_int8(model, shape, ranges, target)
    assert calls == [(2, 16, 4, 4), (2, 16, 4, 4)] and {r.format for r in report} == {"int8q4"}
    monkeypatch.setattr("unsparse_tvm.relay_passes._quad_inputs.QUAD_RELAY_PATCHES", False)
    _, plain = compile_int8(model, shape, ranges, target)
    assert len(calls) == 2
    skip_unless_runs_here(target)
    x = np.random.default_rng(5).standard_normal(shape).astype(np.float32)
    np.testing.assert_array_equal(run(x), plain(x))
    ref = model(torch.from_numpy(x)).detach().numpy()
    assert np.abs(run(x) - ref).max() < 0.1 * np.abs(ref).max()


@pytest.mark.parametrize("n,c,h,w,pad,zp", [
    (1, 8, 2, 2, (1, 1, 1, 1), 128),    # vgg16-cifar's 3x3s on 2x2: a 4x4 padded plane
    (2, 12, 2, 2, (1, 1, 1, 1), 0),     # batch 2, a trailing quad
    (1, 8, 1, 2, (1, 1, 2, 1), 7),      # a 1x2 map padded to 4x4 (8 bytes of input a quad)
])
def test_quad_relay_small_plane_is_the_pad_stage(n, c, h, w, pad, zp, llvm):
    """The small-plane relay writes the padded plane the int8 conv's pad stage writes for a uint8 input."""
    import tvm
    from tvm import te

    from unsparse_tvm.ops.geometry import ConvGeometry
    from unsparse_tvm.ops.int8_formats import ActQuant, pad_quads
    from unsparse_tvm.ops.quad_relay import quad_relay_small_plane, relays_small_plane
    from unsparse_tvm.ops.sparse_int8 import pad_quantize

    run = ConvGeometry(n, c, h, w, 8, 3, 3, (1, 1), pad, (1, 1))
    assert relays_small_plane((n, c, h, w), run)
    quads, act = pad_quads(run), ActQuant(0.1, zp, 255)
    x = np.random.default_rng(c + h).integers(0, 256, (n, c, h, w)).astype(np.uint8)
    xt = te.placeholder((n, c, h, w), "uint8", name="x")
    want_mod = tvm.compile(te.create_prim_func([xt, pad_quantize(xt, run, act, quads)]), target=llvm)
    got_mod = tvm.compile(tvm.IRModule({"main": quad_relay_small_plane(x.shape, run, quads, zp).with_attr(
        "global_symbol", "main")}), target=llvm)
    shape = (n, quads * run.channel_plane, 4)
    want, got = (tvm.runtime.tensor(np.full(shape, 99, np.uint8)) for _ in range(2))
    want_mod["main"](tvm.runtime.tensor(x), want)
    got_mod["main"](tvm.runtime.tensor(x), got)
    np.testing.assert_array_equal(got.numpy(), want.numpy())


def test_2x2_layers_take_their_planes_from_the_relay(llvm, monkeypatch):
    """An int8 3x3 on a 2x2 map whose input is an int8 layer's uint8 output takes its padded plane from
    quad_relay_small_plane (any x86 target); the outputs are bit for bit those of its own pad stage (switch off)."""
    import unsparse_tvm.ops.quad_relay as relay_ops

    monkeypatch.setattr("unsparse_tvm.relay_passes.quantize_int8.GATHERED", False)  # quads on any target
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 20, 3, padding=1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(20 * 4, 5)).eval()
    shape = (2, 8, 2, 2)
    ranges = int8_ready(model, shape, 0.6)
    calls = _record_calls(monkeypatch, relay_ops, "quad_relay_small_plane", lambda a: tuple(a[0]))
    report, run = compile_int8(model, shape, ranges, llvm)
    assert calls == [(2, 16, 2, 2)] and {r.format for r in report} == {"int8q4"}
    monkeypatch.setattr("unsparse_tvm.relay_passes._quad_inputs.QUAD_RELAY_SMALL", False)
    _, plain = compile_int8(model, shape, ranges, llvm)
    assert len(calls) == 1
    x = np.random.default_rng(6).standard_normal(shape).astype(np.float32)
    np.testing.assert_array_equal(run(x), plain(x))
    ref = model(torch.from_numpy(x)).detach().numpy()
    assert np.abs(run(x) - ref).max() < 0.1 * np.abs(ref).max()


def test_quad_relay_patches_declines_other_maps():
    """Only a 4x4 input and output map (16 bytes a channel, 16 positions a tap), C a multiple of 4."""
    from unsparse_tvm.ops.geometry import ConvGeometry
    from unsparse_tvm.ops.quad_relay import relays_patches

    four = ConvGeometry(1, 8, 4, 4, 8, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1)).with_patches(16)
    assert relays_patches((1, 8, 4, 4), four)
    assert not relays_patches((1, 6, 4, 4), four)                       # channels not whole quads
    valid = ConvGeometry(1, 8, 6, 6, 8, 3, 3, (1, 1), (0, 0, 0, 0), (1, 1)).with_patches(16)   # 6x6 in, 4x4 out
    assert valid.patches and not relays_patches((1, 8, 6, 6), valid)


def test_quad_relay_strided_declines_narrow_phase_planes():
    """Phase planes under 4 positions wide (a 3x3/2 on 6x6: 3) keep the pad stage, as does a stride whose
    last step would have to load more than a byte early to stay inside the input row (3 on 48: 2 bytes)."""
    from unsparse_tvm.ops.geometry import ConvGeometry
    from unsparse_tvm.ops.quad_relay import quad_relay_strided

    geo = ConvGeometry(1, 8, 6, 6, 4, 3, 3, (2, 2), (1, 1, 1, 1), (1, 1))
    assert quad_relay_strided((1, 8, 6, 6), geo, 2, 0) is None
    assert quad_relay_strided((1, 8, 8, 8), ConvGeometry(1, 8, 8, 8, 4, 3, 3, (2, 2), (1, 1, 1, 1), (1, 1)),
                              2, 0) is not None
    assert quad_relay_strided((1, 4, 48, 48), ConvGeometry(1, 4, 48, 48, 4, 3, 3, (3, 3), (1, 1, 1, 1), (1, 1)),
                              1, 0) is None


@pytest.mark.parametrize("n,c,h,w,k,stride,pad,zp", [
    (1, 3, 32, 32, 3, 1, (1, 1, 1, 1), 128),   # vgg16-cifar's stem: 3 channels, a quad's 4th at the zero point
    (2, 3, 40, 36, 7, 2, (3, 3, 3, 3), 128),   # resnet50's 7x7/2 stem (smaller): phase planes, batch 2
    (1, 5, 18, 17, 3, 1, (0, 1, 2, 0), 0),     # 5 channels: one quad and one of 1 + 3 padding, asymmetric pads
    (1, 4, 33, 34, 1, 2, (0, 0, 0, 0), 7),     # a strided 1x1: every other row and column read in place
])
def test_quantize_first_is_the_pad_stage(n, c, h, w, k, stride, pad, zp, llvm):
    """An fp32 input quantised to uint8 planes (channels padded to quads) and relayed: the bytes the int8
    conv's pad stage writes when it quantises the fp32 input itself."""
    import tvm
    from tvm import te

    from unsparse_tvm.ops.geometry import ConvGeometry
    from unsparse_tvm.ops.int8_formats import ActQuant, pad_quads, quad_channels
    from unsparse_tvm.ops.quad_relay import quad_relay, quad_relay_strided
    from unsparse_tvm.ops.sparse_int8 import pad_quantize, quantize_channels
    from unsparse_tvm.relay_passes._conv_match import strided_pointwise

    geo = ConvGeometry(n, c, h, w, 4, k, k, (stride, stride), pad, (1, 1))
    run = strided_pointwise(geo) if k == 1 and stride > 1 else geo
    sub = (stride, stride) if run is not geo else (1, 1)
    quads, act, c4 = pad_quads(run), ActQuant(0.015, zp, 255), quad_channels(c) * 4
    x = (np.random.default_rng(c + w).standard_normal((n, c, h, w)) * 1.5).astype(np.float32)  # some clamped
    xt = te.placeholder((n, c, h, w), "float32", name="x")
    want_mod = tvm.compile(te.create_prim_func([xt, pad_quantize(xt, run, act, quads, sub)]), target=llvm)
    planes_mod = tvm.compile(te.create_prim_func([xt, quantize_channels(xt, act, c4)]), target=llvm)
    relay = (quad_relay((n, c4, h, w), run, quads, zp, sub) if run.stride == (1, 1)
             else quad_relay_strided((n, c4, h, w), run, quads, zp))
    relay_mod = tvm.compile(tvm.IRModule({"main": relay.with_attr("global_symbol", "main")}), target=llvm)
    shape = (n, quads * run.channel_plane, 4)
    want, got = (tvm.runtime.tensor(np.full(shape, 99, np.uint8)) for _ in range(2))
    planes = tvm.runtime.tensor(np.zeros((n, c4, h, w), np.uint8))
    want_mod["main"](tvm.runtime.tensor(x), want)
    planes_mod["main"](tvm.runtime.tensor(x), planes)
    relay_mod["main"](planes, got)
    assert (planes.numpy()[:, c:] == zp).all() and {0, 255} <= set(np.unique(planes.numpy()[:, :c]))
    np.testing.assert_array_equal(got.numpy(), want.numpy())


class Fork(nn.Module):
    """The stem's output read by two int8 convs (a strided 1x1 and a strided 3x3, as resnet's downsample and
    conv2), their sum by a padded 3x3, whose output only a 1x1 reads: all uint8 between layers, the 3x3 and
    the 1x1s take the relay, and the 3x3 writes its output wide (rows of 18 with the padding columns) for the
    last 1x1's relay."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.down, self.conv = nn.Conv2d(16, 16, 1, stride=2), nn.Conv2d(16, 16, 3, stride=2, padding=1)
        self.mid, self.last = nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 8, 1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        y = torch.relu(self.stem(x))
        y = torch.relu(self.conv(y) + self.down(y))
        y = torch.relu(self.mid(y))
        return self.fc(torch.relu(self.last(y)).mean(dim=(2, 3)))


def test_shared_uint8_outputs_and_the_relay_change_nothing(llvm, monkeypatch):
    import unsparse_tvm.ops.quad_relay as relay_ops

    monkeypatch.setattr("unsparse_tvm.relay_passes.quantize_int8.GATHERED", False)  # the quads' relays, on any host

    torch.manual_seed(1)
    model = Fork().eval()
    shape = (2, 3, 32, 32)
    ranges = int8_ready(model, shape, 0.7)
    relays = _record_calls(monkeypatch, relay_ops, "quad_relay")  # each call's arguments
    strided = _record_calls(monkeypatch, relay_ops, "quad_relay_strided")

    def build():
        report, run = compile_int8(model, shape, ranges, llvm)
        return {r.name: r.fused for r in report}, run

    fused, run = build()
    assert fused["stem"] == "bias+relu+requant"  # read by `down` and `conv` only: uint8 for both
    assert fused["conv"].endswith("+requant")  # read by `last` only
    # x shape, subsample, pitch: the stem (its fp32 input quantised first, 3 channels padded to a quad),
    # `down` (every 2nd of 32), `mid` (padded), `last` (mid's wide output, rows 18 apart); not `conv` (a
    # strided 3x3, not computed at stride 1): its phase planes by the strided relay
    wide = [a for a in relays if len(a[0]) == 3]
    assert sorted((tuple(a[0]), a[4], a[5]) for a in relays) == [
        ((2, 4, 32, 32), (1, 1), 0), ((2, 16, 16, 16), (1, 1), 0), ((2, 16, 32, 32), (2, 2), 0),
        ((2, 16, int(wide[0][0][2])), (1, 1), 18)]
    assert [tuple(a[0]) for a in strided] == [(2, 16, 32, 32)]
    monkeypatch.setattr("unsparse_tvm.relay_passes.quantize_int8.CHAIN_SHARED", False)
    monkeypatch.setattr("unsparse_tvm.relay_passes._quad_inputs.relays", lambda *a: False)
    monkeypatch.setattr("unsparse_tvm.relay_passes._quad_inputs.QUAD_RELAY_STRIDED", False)
    monkeypatch.setattr("unsparse_tvm.relay_passes.quantize_int8.WIDE_OUTPUTS", False)
    fused_plain, plain = build()
    assert fused_plain["stem"] == "bias+relu"
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    np.testing.assert_array_equal(run(x), plain(x))  # the same integers: requantising = the consumer's quantising
    ref = model(torch.from_numpy(x)).detach().numpy()
    assert np.abs(run(x) - ref).max() < 0.1 * np.abs(ref).max()
    # and the integer arithmetic itself: every conv and the linear layer as PyTorch's integer reference (the
    # strided 3x3 `conv` runs over its output map, a row domain: its rows of 16 read at its phase planes' pitch)
    from test_int8 import _int8_reference
    from unsparse_tvm.schedules.x86_int8 import act_qmax

    exact = _int8_reference(model, ranges, act_qmax(llvm))(torch.from_numpy(x)).detach().numpy()
    assert np.abs(run(x) - exact).max() <= 1e-4 * np.abs(exact).max()


class StridedChain(nn.Module):
    """A strided 3x3 whose rows of 16 make it a row domain, its output read by one relaying 3x3 only."""

    def __init__(self):
        super().__init__()
        self.stem, self.down = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, stride=2, padding=1)
        self.last, self.fc = nn.Conv2d(16, 8, 3, padding=1), nn.Linear(8, 10)

    def forward(self, x):
        y = torch.relu(self.down(torch.relu(self.stem(x))))
        return self.fc(torch.relu(self.last(y)).mean(dim=(2, 3)))


def test_a_row_domain_producer_is_not_also_wide(llvm):
    """`down` computes over its output map (a row domain, rows of 16), which is its output's layout already:
    its reader's relay must read rows 16 apart, not at the phase planes' pitch a wide output would have."""
    from test_int8 import _int8_reference
    from unsparse_tvm.schedules.x86_int8 import act_qmax

    torch.manual_seed(2)
    model = StridedChain().eval()
    shape = (1, 3, 32, 32)
    ranges = int8_ready(model, shape, 0.6)
    report, run = compile_int8(model, shape, ranges, llvm)
    assert {r.name: r.fused for r in report}["down"] == "bias+relu+requant"
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    exact = _int8_reference(model, ranges, act_qmax(llvm))(torch.from_numpy(x)).detach().numpy()
    assert np.abs(run(x) - exact).max() <= 1e-4 * np.abs(exact).max()


class StemChain(nn.Module):
    """vgg's start: a 3x3 stem on the fp32 input, its output read by one padded 3x3 only."""

    def __init__(self):
        super().__init__()
        self.stem, self.mid = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.mid(torch.relu(self.stem(x)))).mean(dim=(2, 3)))


def test_a_stem_quantised_first_relays_and_writes_wide(llvm, monkeypatch):
    """The stem's fp32 input is quantised to 4 uint8 planes and relayed; its output, which only `mid` reads,
    is then written wide (rows of 34) for mid's relay. QUANTIZE_FIRST off: the stem's pad stage quantises
    and its output is cropped by an epilogue pass. The same integers either way, and PyTorch's."""
    import unsparse_tvm.ops.quad_relay as relay_ops
    from test_int8 import _int8_reference
    from unsparse_tvm.schedules.x86_int8 import act_qmax

    monkeypatch.setattr("unsparse_tvm.relay_passes.quantize_int8.GATHERED", False)  # the quads, on any host
    torch.manual_seed(3)
    model = StemChain().eval()
    shape = (2, 3, 32, 32)
    ranges = int8_ready(model, shape, 0.7)
    relays = _record_calls(monkeypatch, relay_ops, "quad_relay")
    _, run = compile_int8(model, shape, ranges, llvm)
    assert sorted((tuple(a[0]), a[5]) for a in relays) == [((2, 4, 32, 32), 0), ((2, 16, 32 * 34), 34)]
    monkeypatch.setattr("unsparse_tvm.relay_passes._quad_inputs.QUANTIZE_FIRST", False)
    relays.clear()
    _, plain = compile_int8(model, shape, ranges, llvm)
    assert [tuple(a[0]) for a in relays] == [(2, 16, 32, 32)]
    x = np.random.default_rng(3).standard_normal(shape).astype(np.float32)
    np.testing.assert_array_equal(run(x), plain(x))
    exact = _int8_reference(model, ranges, act_qmax(llvm))(torch.from_numpy(x)).detach().numpy()
    assert np.abs(run(x) - exact).max() <= 1e-4 * np.abs(exact).max()


class PooledFork(nn.Module):
    """resnet's start: a strided 7x7 stem, its 3x3/2 max pool, read by a block's first 1x1 and its downsample."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 7, stride=2, padding=3)
        self.c1, self.c2, self.down = nn.Conv2d(8, 8, 1), nn.Conv2d(8, 16, 3, padding=1), nn.Conv2d(8, 16, 1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        p = nn.functional.max_pool2d(torch.relu(self.stem(x)), 3, 2, 1)
        y = torch.relu(self.c2(torch.relu(self.c1(p))) + self.down(p))
        return self.fc(y.mean(dim=(2, 3)))


def test_the_stem_writes_uint8_through_its_max_pool(llvm, monkeypatch):
    """The stem's output, pooled and then read by two int8 convs, travels as uint8: the stem requantises, the
    vector max pool runs on bytes (64-wide rows: whole 32-byte vectors), and the result is the same integers."""
    import unsparse_tvm.relay_passes.vector_max_pool as vmp

    torch.manual_seed(2)
    model = PooledFork().eval()
    shape = (1, 3, 128, 128)
    ranges = int8_ready(model, shape, 0.7)
    pools = _record_calls(monkeypatch, vmp, "max_pool_3x3s2", lambda a: a[1])  # a[1]: the dtype
    report, run = compile_int8(model, shape, ranges, llvm)
    assert {r.name: r.fused for r in report}["stem"] == "bias+relu+requant" and pools == ["uint8"]
    monkeypatch.setattr("unsparse_tvm.relay_passes.quantize_int8.CHAIN_SHARED", False)
    pools.clear()
    plain_report, plain = compile_int8(model, shape, ranges, llvm)
    assert {r.name: r.fused for r in plain_report}["stem"] == "bias+relu" and pools == ["float32"]
    x = np.random.default_rng(2).standard_normal(shape).astype(np.float32)
    np.testing.assert_array_equal(run(x), plain(x))  # a max pool commutes with the (monotone) quantisation
    from test_int8 import _int8_reference
    from unsparse_tvm.schedules.x86_int8 import act_qmax

    exact = _int8_reference(model, ranges, act_qmax(llvm))(torch.from_numpy(x)).detach().numpy()
    assert np.abs(run(x) - exact).max() <= 1e-4 * np.abs(exact).max()


def test_quantising_loops_stay_vectors(llvm):
    """ops.sparse_int8.quantize in a vectorised loop lowers to vector code (TVM 0.27 left nearbyint out of
    its vectorisable ops, so such loops came back scalar; now it rounds by adding ROUNDING_BIAS, no nearbyint),
    rounding half to even and clamping as torch does, an odd zero point too."""
    import tvm
    from tvm import s_tir, te, tirx

    from unsparse_tvm.ops.int8_formats import ActQuant
    from unsparse_tvm.ops.sparse_int8 import quantize

    act = ActQuant(0.5, 3, 255)
    a = te.placeholder((64,), "float32", name="a")
    sch = s_tir.Schedule(te.create_prim_func([a, te.compute((64,), lambda i: quantize(a[i], act), name="q")]))
    _, inner = sch.split(sch.get_loops(sch.get_sblock("q"))[0], [4, 16])
    sch.vectorize(inner)
    lowered = tvm.ir.transform.Sequential([
        s_tir.transform.LowerInitBlock(), s_tir.transform.ConvertBlocksToOpaque(), s_tir.transform.LowerOpaqueBlock(),
        tirx.transform.FlattenBuffer(), tirx.transform.VectorizeLoop(True)])(sch.mod).script()
    assert "T.reinterpret(\"int32x16\"" in lowered and "uint8x16" in lowered and "_s in range" not in lowered, lowered
    x = np.array([0.25, 0.75, 1.25, -1.25, -1.75, 126.0, 200.0, -9.0] * 8, dtype=np.float32)  # ties at x/0.5 = .5
    y = tvm.runtime.tensor(np.zeros(64, np.uint8))
    tvm.compile(sch.mod, target=llvm)["main"](tvm.runtime.tensor(x), y)
    want = np.clip(np.round(x / 0.5) + 3, 0, 255).astype(np.uint8)  # numpy rounds half to even
    np.testing.assert_array_equal(y.numpy(), want)


@pytest.mark.parametrize("zp", [0, 3, 128])
def test_a_relu_as_the_quantising_clamp(zp, llvm):
    """quantize(v, act, relu=True), the int8 epilogues' ReLU folded into the clamp at the zero point, gives the
    bytes of quantize(max(v, 0), act) (ties, -0.0, values past both ends), in the conv epilogue's vector loops
    and in the gathered kernels' write-back (quantize_lanes)."""
    import tvm
    from tvm import te, tirx

    from unsparse_tvm.ops.int8_formats import ActQuant
    from unsparse_tvm.ops.sparse_int8 import quantize
    from unsparse_tvm.ops.sparse_int8_gathered import quantize_lanes
    from tvm.script import tirx as T

    act = ActQuant(0.5, zp, 255)
    x = np.array([0.25, 0.75, -0.25, -0.0, 1.25, -1.25, -1.75, 126.0, 200.0, -9.0, 0.0, 1e-30, -1e-30, -3e38,
                  3e38, 64.25] * 4, dtype=np.float32)
    a = te.placeholder((64,), "float32", name="a")

    def run(fn):
        out = tvm.runtime.tensor(np.zeros(64, np.uint8))
        tvm.compile(te.create_prim_func([a, te.compute((64,), lambda i: fn(a[i]), name="q")]), target=llvm)["main"](
            tvm.runtime.tensor(x), out)
        return out.numpy()

    want = run(lambda v: quantize(tirx.max(v, tirx.const(0.0, "float32")), act))
    np.testing.assert_array_equal(run(lambda v: quantize(v, act, relu=True)), want)
    with np.errstate(over="ignore"):  # 3e38 / 0.5 is inf in float32, clipped to 255 as the kernels clamp it
        assert (want == np.clip(np.round(np.maximum(x, 0) / 0.5) + zp, 0, 255)).all()

    @T.prim_func(s_tir=True)
    def lanes(xb: T.Buffer((64,), "float32"), yb: T.Buffer((64,), "uint8")):
        for i in range(4):
            yb[T.Ramp(i * 16, 1, 16)] = quantize_lanes(xb[T.Ramp(i * 16, 1, 16)], act, 16, True)

    out = tvm.runtime.tensor(np.zeros(64, np.uint8))
    tvm.compile(lanes, target=llvm)["main"](tvm.runtime.tensor(x), out)
    np.testing.assert_array_equal(out.numpy(), want)


def test_the_epilogue_skips_comp_after_a_relu():
    """An int8 conv whose input zero point is 0 (its input after a ReLU) has comp = zp * row sums = 0: its
    epilogue does not read comp; with zp 128 (a symmetric input) it does."""
    from tvm import te

    from unsparse_tvm.ops.geometry import ConvGeometry
    from unsparse_tvm.ops.int8_formats import ActQuant
    from unsparse_tvm.ops.sparse_int8 import sparse_conv2d_int8

    geo = ConvGeometry(1, 8, 16, 16, 4, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1))
    for zp, reads in ((0, False), (128, True)):
        x = te.placeholder((1, 8, 16, 16), "float32", name="x")
        data, off = te.placeholder((4, 5, 4), "int8", name="data"), te.placeholder((4, 5), "int32", name="off")
        comp, scale = te.placeholder((4,), "int32", name="comp"), te.placeholder((4,), "float32", name="scale")
        out = sparse_conv2d_int8(x, data, off, comp, scale, geo=geo, act=ActQuant(0.1, zp, 255), quads=3,
                                 has_bias=False, has_residual=False, relu=True, out_act=ActQuant(0.2, 0, 255))
        script = te.create_prim_func([x, data, off, comp, scale, out]).script()
        assert ("comp[" in script) == reads, script
