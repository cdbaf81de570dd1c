"""Gathered quads (relay_passes/_gathered_int8.py, ops.sparse_int8_gathered): the layers whose quads hold few
nonzeros take any 4 nonzeros of a row per vpdpbusd (AVX2: vpmaddubsw + vpmaddwd). The same integers as the quads,
so the same outputs bit for bit; run where the host has AVX-512 VNNI and VBMI or AVX2 without AVX-512, compiled
and read as assembly elsewhere."""

import numpy as np
import pytest
import torch
import torch.nn as nn

from conftest import compile_int8, cpu_target, int8_ready


def _gathers_here() -> bool:
    """Whether the host runs the gathered kernels: AVX-512 VNNI and VBMI (16 lanes), or AVX2 without AVX-512 (8)."""
    from unsparse_tvm.hostcpu import host_features

    have = set(host_features())
    return {"avx512vnni", "avx512vbmi"} <= have or ("avx2" in have and "avx512f" not in have)


NOT_HERE = "the host runs no gathered kernel (AVX-512 without VNNI and VBMI; see the assembly tests)"


class SmallMaps(nn.Module):
    """Every gathered path: a 16x16 map on its padded planes (the epilogue a kernel of its own), 8x8 and 4x4 maps
    as patches (the epilogue in the write-back, uint8 between them; one dilated), 2x2 maps (4 rows x 4 positions
    a vector) with a residual add (the epilogue after the conv) and with a float32 output, and a strided conv and
    the linear layer that keep their quads."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(8, 32, 3, padding=1)                # 16x16: padded planes
        self.p = nn.Conv2d(32, 32, 3, padding=1)               # 8x8 patches
        self.b = nn.Conv2d(32, 32, 3, padding=1)               # 4x4 patches, after a 4x4 max pool
        self.c = nn.Conv2d(32, 64, 3, padding=2, dilation=2)   # 4x4 patches, dilated
        self.d = nn.Conv2d(64, 64, 3, padding=1)               # 2x2 tiny, residual
        self.e = nn.Conv2d(64, 16, 3, padding=1)               # 2x2 tiny, float32 out
        self.s = nn.Conv2d(16, 12, 3, stride=2, padding=1)     # strided: quads
        self.fc = nn.Linear(12, 10)

    def forward(self, x):                                               # x [N, 8, 16, 16]
        y = torch.relu(self.a(x))                                       # [N, 32, 16, 16]
        y = torch.relu(self.p(nn.functional.max_pool2d(y, 2)))          # [N, 32, 8, 8]
        y = nn.functional.max_pool2d(y, 2)                              # [N, 32, 4, 4]
        y = torch.relu(self.c(torch.relu(self.b(y))))                   # [N, 64, 4, 4]
        y = nn.functional.max_pool2d(y, 2)                              # [N, 64, 2, 2]
        y = torch.relu(self.d(y) + y)
        y = self.s(self.e(y))                                           # [N, 12, 1, 1]
        return self.fc(y.flatten(1))


def _formats(report) -> dict:
    return {r.name: r.format for r in report}


def _gathered_and_quads(model, shape, llvm, monkeypatch, gathered: tuple, seed: int, ranges: dict | None = None):
    """Compile `model` int8 with gathered quads and without (GATHERED off: the negative control); check which
    layers went gathered (the rest int8q4) and that both give the same outputs bit for bit on a seeded input.
    Returns (run, ranges, x) for further checks; skips where the target cannot run gathered kernels."""
    from unsparse_tvm.ops.sparse_int8_gathered import gathers

    if not gathers(llvm):
        pytest.skip("the target (UNSPARSE_MCPU) has AVX-512 without VNNI and VBMI: no gathered kernels")
    ranges = int8_ready(model, shape, 0.85) if ranges is None else ranges
    report, run = compile_int8(model, shape, ranges, llvm)
    formats = _formats(report)
    assert formats == {name: "int8g4" if name in gathered else "int8q4" for name in formats}, formats
    assert set(gathered) <= set(formats)
    monkeypatch.setattr("unsparse_tvm.relay_passes.quantize_int8.GATHERED", False)
    plain_report, plain = compile_int8(model, shape, ranges, llvm)
    assert set(_formats(plain_report).values()) == {"int8q4"}
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    np.testing.assert_array_equal(run(x), plain(x))
    assert np.abs(run(x)).max() > 0
    return run, ranges, x


@pytest.mark.skipif(not _gathers_here(), reason=NOT_HERE)
@pytest.mark.parametrize("batch", [1, 2])
def test_gathered_layers_are_the_quads_integers(batch, llvm, monkeypatch):
    from unsparse_tvm.schedules.x86_int8 import act_qmax
    from test_int8 import _int8_reference

    torch.manual_seed(7 + batch)
    model = SmallMaps().eval()  # the strided conv and the linear layer keep their quads
    run, ranges, x = _gathered_and_quads(model, (batch, 8, 16, 16), llvm, monkeypatch, tuple("apbcde"), batch)
    exact = _int8_reference(model, ranges, act_qmax(llvm))(torch.from_numpy(x)).detach().numpy()
    assert np.abs(run(x) - exact).max() <= 1e-4 * np.abs(exact).max()


class Pointwise(nn.Module):
    """Which 1x1s and small maps go gathered (_gathered_int8.geometry): a 1x1 that reduces channels on a 14x14 map
    and any 1x1 on a 7x7 (gathered: input stage and epilogue pass), one that expands on 14x14 (quads); 3x3s on
    14x14 and 7x7 padded planes; a 7x7 1x1 with a residual add."""

    def __init__(self):
        super().__init__()
        self.reduce = nn.Conv2d(64, 16, 1)                   # 14x14, 64 -> 16: gathered
        self.mid = nn.Conv2d(16, 16, 3, padding=1)           # 14x14 3x3: gathered planes
        self.expand = nn.Conv2d(16, 64, 1)                   # 14x14, 16 -> 64: quads
        self.small = nn.Conv2d(64, 32, 3, padding=1)         # 7x7 3x3: gathered planes
        self.widen = nn.Conv2d(32, 32, 1)                    # 7x7 1x1 + residual: gathered, epilogue pass
        self.fc = nn.Linear(32, 10)

    def forward(self, x):                                                        # x [N, 64, 14, 14]
        y = torch.relu(self.expand(torch.relu(self.mid(torch.relu(self.reduce(x))))))  # [N, 64, 14, 14]
        y = torch.relu(self.small(nn.functional.max_pool2d(y, 2)))               # [N, 32, 7, 7]
        y = torch.relu(self.widen(y) + y)
        return self.fc(y.mean((2, 3)))


@pytest.mark.skipif(not _gathers_here(), reason=NOT_HERE)
@pytest.mark.parametrize("batch", [1, 2])
def test_pointwise_and_small_maps_gathered_are_the_quads_integers(batch, llvm, monkeypatch):
    from unsparse_tvm.ops.sparse_int8_gathered import gather_lanes

    torch.manual_seed(3 + batch)  # the expanding 1x1 (but on AVX2: every 1x1) and the linear layer keep their quads
    _gathered_and_quads(Pointwise().eval(), (batch, 64, 14, 14), llvm, monkeypatch,
                        ("reduce", "mid", "small", "widen") + (("expand",) if gather_lanes(llvm) == 8 else ()), batch)


@pytest.mark.parametrize("hw", [1, 4])
def test_pointwise_convs_on_small_maps_keep_their_quads(hw, llvm):
    """A 1x1 on a map under 7x7 (a squeeze-excitation's on its pooled 1x1 map; a 4x4) keeps the quads: the
    gathered kernel's planes would be a position or a few (its input stage failed to build on a 1-byte plane)."""
    from unsparse_tvm.ops.geometry import ConvGeometry
    from unsparse_tvm.relay_passes import _gathered_int8

    w = np.where(np.random.default_rng(hw).random((8, 32, 1, 1)) < 0.9, 0, 1.0).astype(np.float32)
    geo = ConvGeometry(1, 32, hw, hw, 8, 1, 1, (1, 1), (0, 0, 0, 0), (1, 1))
    assert _gathered_int8.geometry(w, geo) is None
    torch.manual_seed(hw)
    model = nn.Sequential(nn.Conv2d(8, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(hw), nn.Conv2d(32, 8, 1),
                          nn.ReLU(), nn.Flatten(), nn.Linear(8 * hw * hw, 4)).eval()
    shape = (1, 8, 8, 8)
    ranges = int8_ready(model, shape, 0.85)
    report, run = compile_int8(model, shape, ranges, llvm)  # builds
    assert _formats(report)["3"] == "int8q4"
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    ref = model(torch.from_numpy(x)).detach().numpy()
    assert np.abs(run(x) - ref).max() <= 0.05 * np.abs(ref).max()


class Strided(nn.Module):
    """Stride-2 layers on phase planes (gathered_inputs.pad_phase_planes): a 7x7 stem on an odd-sized float32
    input, a 3x3 reading its uint8 output, then a stride-1 3x3 whose epilogue is cropped from its domain."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 7, stride=2, padding=3)  # 37x37 -> 19x19
        self.down = nn.Conv2d(16, 32, 3, stride=2, padding=1)  # 19x19 -> 10x10
        self.mid = nn.Conv2d(32, 32, 3, padding=1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):                                                     # x [N, 3, 37, 37]
        y = torch.relu(self.down(torch.relu(self.stem(x))))                   # [N, 32, 10, 10]
        return self.fc(torch.relu(self.mid(y)).mean((2, 3)))


@pytest.mark.skipif(not _gathers_here(), reason=NOT_HERE)
@pytest.mark.parametrize("batch", [1, 2])
def test_strided_layers_gathered_are_the_quads_integers(batch, llvm, monkeypatch):
    torch.manual_seed(21 + batch)
    _gathered_and_quads(Strided().eval(), (batch, 3, 37, 37), llvm, monkeypatch, ("stem", "down", "mid"), batch)


class PlanesChain(nn.Module):
    """Two padded-planes layers in a row (an 18x18 map: the domain's thrown-away lanes spill onto the next plane's
    padding), then one whose planes are laid out otherwise (dilated: a wider pitch), which its producer cannot
    write into."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(8, 24, 3, padding=1)
        self.b = nn.Conv2d(24, 16, 3, padding=1)
        self.c = nn.Conv2d(16, 16, 3, padding=2, dilation=2)
        self.fc = nn.Linear(16 * 9 * 9, 10)

    def forward(self, x):                                           # x [N, 8, 18, 18]
        y = torch.relu(self.b(torch.relu(self.a(x))))               # [N, 16, 18, 18]
        y = nn.functional.max_pool2d(torch.relu(self.c(y)), 2)      # [N, 16, 9, 9]
        return self.fc(y.flatten(1))


@pytest.mark.skipif(not _gathers_here(), reason=NOT_HERE)
@pytest.mark.parametrize("batch", [1, 2])
def test_padded_planes_written_into_the_next_layers_planes(batch, llvm, monkeypatch):
    """A padded-planes layer writes straight into the next one's planes (IntoPlanes; design.md item 40): the
    same outputs bit for bit as its epilogue pass and the next pad stage (INTO_PLANES off, the control), and
    only where the two planes' layouts agree."""
    from unsparse_tvm.ops.sparse_int8_gathered import gathers
    from unsparse_tvm.relay_passes import _gathered_int8

    if not gathers(llvm):
        pytest.skip("the target (UNSPARSE_MCPU) has AVX-512 without VNNI and VBMI: no gathered kernels")
    found = []
    real = _gathered_int8.into_planes
    monkeypatch.setattr(_gathered_int8, "into_planes", lambda rw, readers: found.append(real(rw, readers)) or found[-1])
    torch.manual_seed(11 + batch)
    model = PlanesChain().eval()
    shape = (batch, 8, 18, 18)
    ranges = int8_ready(model, shape, 0.85)
    report, run = compile_int8(model, shape, ranges, llvm)
    assert _formats(report) == {**dict.fromkeys("abc", "int8g4"), "fc": "int8q4"}
    assert [len(f) for f in found] == [1]  # a -> b only
    (into,) = found[0].values()
    assert (into.wq, into.oh, into.ow, into.shift) == (20, 18, 18, 21)
    monkeypatch.setattr("unsparse_tvm.relay_passes.quantize_int8.INTO_PLANES", False)
    _, plain = compile_int8(model, shape, ranges, llvm)
    monkeypatch.setattr("unsparse_tvm.relay_passes.quantize_int8.GATHERED", False)  # and the quads' integers
    _, quads = compile_int8(model, shape, ranges, llvm)
    x = np.random.default_rng(batch).standard_normal(shape).astype(np.float32)
    np.testing.assert_array_equal(run(x), plain(x))
    np.testing.assert_array_equal(run(x), quads(x))  # (18x18: 4 vectors a tile, sparse_int8_gathered.UNPACKED)
    assert np.abs(run(x)).max() > 0


class MapRows(nn.Module):
    """Stride-1 1x1s gathered with their rows written as the output map: one adding the fp32 model input (c), one
    without a residual (d), one adding a uint8 block output (e: s, which int8 convs read too; e expands, so with
    VNNI it is gathered only under 64 positions)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(16, 64, 3, padding=1)
        self.c = nn.Conv2d(64, 16, 1)
        self.d = nn.Conv2d(64, 32, 1)
        self.e = nn.Conv2d(32, 64, 1)

    def forward(self, x):                                      # x [N, 16, H, W]
        s = torch.relu(self.stem(x))                           # [N, 64, H, W]
        z = torch.relu(self.c(s) + x)                          # [N, 16, H, W]
        y = torch.relu(self.e(torch.relu(self.d(s))) + s)      # [N, 64, H, W]
        return torch.cat([z.mean((2, 3)), y.mean((2, 3))], 1)  # [N, 80]


@pytest.mark.skipif(not _gathers_here(), reason=NOT_HERE)
@pytest.mark.parametrize("hw", [7, 10, 12, 16])
def test_pointwise_rows_written_as_the_map_with_their_residuals(hw, llvm, monkeypatch):
    """A gathered stride-1 1x1 writes its rows as the output map (no crop pass) and adds a residual in its
    write-back (no epilogue pass): 49, 100, 144 and 256 positions (the domain past the map by a vector with 1 lane
    in it, 4, none, or not at all), batch 2; the same outputs bit for bit as with the domain cropped and the
    epilogue pass (MAP_ROWS off). (8x8 maps run as patches: their 1x1s keep the quads.)"""
    from unsparse_tvm.ops import sparse_int8_gathered as g
    from unsparse_tvm.relay_passes import _gathered_int8

    writes, real = [], g.gathered_conv
    monkeypatch.setattr(g, "gathered_conv", lambda *a, **kw: writes.append(a[5]) or real(*a, **kw))
    torch.manual_seed(hw)
    model, shape = MapRows().eval(), (2, 16, hw, hw)
    ranges = int8_ready(model, shape, 0.85)
    report, run = compile_int8(model, shape, ranges, llvm)
    expand = g.gather_lanes(llvm) == 8 or hw * hw < 64  # (_gathered_int8.geometry's 1x1 rule)
    gathered = {r.name for r in report if r.format == "int8g4"}
    assert gathered == {"stem", "c", "d"} | ({"e"} if expand else set()), gathered
    maps = [w for w in writes if w.positions]
    assert len(maps) == 2 + expand and {w.positions for w in maps} == {hw * hw}
    assert sorted(w.res_act is None for w in maps if w.residual) == [False] * expand + [True]  # uint8 (e), fp32 (c)
    monkeypatch.setattr(_gathered_int8, "MAP_ROWS", False)
    writes.clear()
    _, plain = compile_int8(model, shape, ranges, llvm)
    assert not any(w.positions for w in writes) and sum(not w.fused for w in writes) == 1 + expand
    x = np.random.default_rng(hw).standard_normal(shape).astype(np.float32)
    np.testing.assert_array_equal(run(x), plain(x))
    assert np.abs(run(x)).max() > 0


@pytest.mark.skipif(not _gathers_here(), reason=NOT_HERE)
@pytest.mark.parametrize("hw, residual", [(7, "uint8"), (10, "float32"), (12, None)])
def test_rows_written_as_the_map_stay_inside_their_rows(hw, residual, llvm):
    """The kernel alone, its output a view into a larger buffer: rows written as the map (WriteBack.positions) end
    at the map's end, nothing past the output is written (a whole vector across the end would spill 15, 4 or 16
    positions into the next row and past the last one), and without a residual each row is the domain's row
    (positions 0) cut at the map's end."""
    import tvm

    from unsparse_tvm.ops import sparse_int8_gathered as g
    from unsparse_tvm.ops.geometry import ConvGeometry
    from unsparse_tvm.ops.int8_formats import ActQuant

    rng = np.random.default_rng(hw)
    n, c, k, size = 2, 64, 16, hw * hw
    geo = ConvGeometry(n, c, hw, hw, k, 1, 1, (1, 1), (0, 0, 0, 0), (1, 1))
    lanes = g.gather_lanes(llvm)
    plan = g.plan(geo, lanes)
    rows = g.gathered_rows(np.where(rng.random((k, c, 1, 1)) < 0.2, rng.integers(-127, 128, (k, c, 1, 1)), 0)
                           .astype(np.int8), geo, plan.tile)
    act, res_act = ActQuant(0.05, 0, 127), ActQuant(0.1, 3, 127) if residual == "uint8" else None
    consts = [rng.integers(0, 128, (n, plan.input_length(geo))).astype(np.uint8), rows.data, rows.off, rows.glen,
              rng.integers(-50, 50, k).astype(np.int32), rng.random(k).astype(np.float32) * 0.01,
              rng.standard_normal(k).astype(np.float32)]
    res = [(rng.integers(0, 128, (n, k, hw, hw)) if residual == "uint8" else rng.standard_normal((n, k, hw, hw)))
           .astype(residual)] if residual else []

    def run(out: "g.WriteBack", shape: tuple, guard: int = 0) -> np.ndarray:
        kernel = g.gathered_conv(n, plan.input_length(geo), rows, plan.q, plan.unroll, out, shape, lanes)
        f = tvm.compile(tvm.IRModule({"conv": kernel.with_attr("global_symbol", "conv")}), target=llvm)["conv"]
        whole = tvm.runtime.tensor(np.full(int(np.prod(shape)) + guard, 77, np.uint8))
        f(*(tvm.runtime.tensor(a) for a in consts + res), whole._create_view(shape, "uint8", 0))
        return whole.numpy()

    written = run(g.WriteBack(True, True, act, positions=size, residual=bool(res), res_act=res_act),
                  (n, k, hw, hw), guard=256)
    assert (written[n * k * size:] == 77).all(), "a row written past the output's end"
    if not res:
        domain = run(g.WriteBack(True, True, act), (n, k, plan.q)).reshape(n, k, plan.q)
        np.testing.assert_array_equal(written[:n * k * size].reshape(n, k, size), domain[:, :, :size])


def test_gathered_layers_keep_their_quads_where_quads_fill():
    """channel4-style weights (whole quads of 4 channels) keep the quads: a gathered group would hold the same 4."""
    from unsparse_tvm.ops.geometry import ConvGeometry
    from unsparse_tvm.relay_passes import _gathered_int8

    geo = ConvGeometry(1, 64, 4, 4, 64, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1))
    w = np.random.default_rng(0).standard_normal((64, 64, 3, 3)).astype(np.float32)
    quads = w.reshape(64, 16, 4, 3, 3)
    quads[np.random.default_rng(1).random((64, 16, 1, 3, 3)).repeat(4, axis=2) < 0.9] = 0
    assert _gathered_int8.geometry(w, geo) is None
    scattered = np.where(np.random.default_rng(2).random(w.shape) < 0.9, 0, w + 1)  # a quad holds ~1.15
    assert _gathered_int8.geometry(scattered, geo).patches


def test_grouped_rows_go_gathered_sharing_their_columns_on_avx2(monkeypatch):
    """Rows in groups (vector-4 masks: 4 output channels share each nonzero position) go gathered everywhere; on
    AVX2 their tiles share the columns (one interleave a tile: shared_group 4), scattered rows keep their own, and
    VNNI is unchanged. SHARED_ROWS off: grouped rows stay fp32 on AVX2 (per-row interleaves ran 0.904x fp32)."""
    from unsparse_tvm.ops.geometry import ConvGeometry
    from unsparse_tvm.relay_passes import _gathered_int8

    geo = ConvGeometry(1, 64, 16, 16, 64, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1))
    rng = np.random.default_rng(5)
    w = rng.standard_normal((64, 64, 3, 3)).astype(np.float32) + 2
    grouped = w * (rng.random((16, 1, 64, 3, 3)) < 0.1).repeat(4, axis=1).reshape(64, 64, 3, 3)
    scattered = w * (rng.random(w.shape) < 0.1)
    for lanes in (8, 16):
        assert _gathered_int8.geometry(grouped, geo, lanes) is not None
        assert _gathered_int8.geometry(scattered, geo, lanes) is not None
    assert _gathered_int8.shared_group(grouped, geo, 8) == 4
    assert _gathered_int8.shared_group(grouped, geo, 16) == 0 and _gathered_int8.shared_group(scattered, geo, 8) == 0
    monkeypatch.setattr(_gathered_int8, "SHARED_ROWS", False)
    assert _gathered_int8.geometry(grouped, geo, 8) is None and _gathered_int8.geometry(grouped, geo, 16) is not None
    assert _gathered_int8.shared_group(grouped, geo, 8) == 0


def _group_masked(model: nn.Module, seed: int) -> nn.Module:
    """Each conv's weights under a vector-4 mask (convs a, b, d: 4 output channels share each kept position) or a
    4x4 block mask (the others), about 85% zero, and one more weight in ten zeroed inside the kept groups (a tile's
    rows then share columns where some of them hold zeros)."""
    from unsparse_tvm.compress.masks import block_mask, vector_mask

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, nn.Conv2d) and m.out_channels % 4 == 0:
                mask = vector_mask(m.weight, 0.85, 4) if name in "abd" else block_mask(m.weight, 0.85, 4)
                m.weight.mul_(mask * (torch.rand(m.weight.shape, generator=gen) > 0.1))
    return model


@pytest.mark.skipif(not _gathers_here(), reason=NOT_HERE)
@pytest.mark.parametrize("batch", [1, 2])
def test_grouped_rows_gathered_are_the_quads_integers(batch, llvm, monkeypatch):
    """Vector- and block-masked convs on every gathered path (padded planes, 8x8 and 4x4 patches, 2x2 tiles),
    gathered with shared columns on AVX2: the quads' outputs bit for bit."""
    torch.manual_seed(11 + batch)
    model = _group_masked(SmallMaps().eval(), batch)
    ranges = int8_ready(model, (batch, 8, 16, 16), 0.0)  # (zeroes nothing more: the masks are the pruning)
    _gathered_and_quads(model, (batch, 8, 16, 16), llvm, monkeypatch, tuple("apbcde"), batch, ranges)


def test_shared_rows_interleave_once_a_tile_for_haswell():
    """On any host: built for Haswell, a tile of 2 rows sharing its columns interleaves each group's inputs once
    (half the unpacks of the same tile with rows of their own), and reads row 0's offsets only: rows 1.. offsets
    scrambled, the kernel is the same code."""
    import dataclasses

    import tvm

    from unsparse_tvm.ops import sparse_int8_gathered as g
    from unsparse_tvm.ops.geometry import ConvGeometry
    from unsparse_tvm.ops.int8_formats import ActQuant

    rng = np.random.default_rng(6)
    geo = dataclasses.replace(ConvGeometry(1, 32, 8, 8, 16, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1)), patches=True)
    keep = (rng.random((8, 1, 32, 3, 3)) < 0.15).repeat(2, axis=1).reshape(16, 32, 3, 3)
    wq = np.where(keep, rng.integers(-127, 128, (16, 32, 3, 3)), 0).astype(np.int8)
    plan = g.plan(geo, 8, shared=2)
    assert (plan.tile, plan.unroll) == (2, 4)

    def unpacks(shared: bool) -> int:
        rows = g.gathered_rows(wq, geo, plan.tile, shared=shared)
        conv = g.gathered_conv(1, plan.input_length(geo), rows, plan.q, plan.unroll,
                               g.WriteBack(True, True, ActQuant(0.1, 0, 127)), lanes=8)
        asm = tvm.compile(tvm.IRModule({"conv": conv.with_attr("global_symbol", "conv")}),
                          target=cpu_target("haswell")).mod.inspect_source("asm")
        return sum(asm.count(op) for op in ("vpunpcklbw", "vpunpckhbw", "vpunpcklwd", "vpunpckhwd"))

    assert unpacks(False) == 2 * unpacks(True) > 0
    rows = g.gathered_rows(wq, geo, plan.tile, shared=True)
    assert rows.stored == rows.glen.sum() * 2 * 4 and rows.stored <= 4 * -(-rows.nnz // 4) + 2 * 4 * len(rows.glen)
    assert (rows.off[:, :, 1] == rows.off[:, :, 0]).all()  # each row at its tile's columns


def test_gathered_kernels_compile_to_gathers_for_znver4():
    """On any host: the kernels built for Zen 4 use the instructions they are written for."""
    import dataclasses

    import tvm

    from unsparse_tvm.ops import sparse_int8_gathered as g
    from unsparse_tvm.ops.gathered_inputs import pad_patches
    from unsparse_tvm.ops.geometry import ConvGeometry
    from unsparse_tvm.ops.int8_formats import ActQuant

    rng = np.random.default_rng(3)
    for h in (2, 4, 8):
        geo = dataclasses.replace(ConvGeometry(1, 64, h, h, 64, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1)), patches=True)
        wq = np.where(rng.random((64, 64, 3, 3)) < 0.1, rng.integers(-127, 128, (64, 64, 3, 3)), 0).astype(np.int8)
        plan = g.plan(geo)
        rows = g.gathered_rows(wq, geo, plan.tile)
        out = g.WriteBack(True, True, ActQuant(0.1, 0, 255))
        conv = g.gathered_conv(1, plan.input_length(geo), rows, plan.q, plan.unroll, out)
        pad = pad_patches((1, 64, h, h), "uint8", geo, ActQuant(0.1, 0, 255))
        mod = tvm.IRModule({"conv": conv.with_attr("global_symbol", "conv"),
                            "pad": pad.with_attr("global_symbol", "pad")})
        asm = tvm.compile(mod, target=cpu_target("znver4")).mod.inspect_source("asm")
        assert "vpdpbusd" in asm and "vpgatherdd" not in asm  # 2x2: scalar loads beat Zen 4's gathers
        assert ("vpinsrd" in asm) == (h == 2) and ("vpermb" in asm or "vpermt2b" in asm or "vpshufb" in asm)
        # 8x8: 4 vectors a tile, each nonzero's 64 bytes interleaved by unpacks (UNPACKED)
        conv_asm = tvm.compile(tvm.IRModule({"conv": conv.with_attr("global_symbol", "conv")}),
                               target=cpu_target("znver4")).mod.inspect_source("asm")
        assert (plan.unroll == 4) == (h == 8) and ("vpunpcklbw" in conv_asm and "vpunpckhwd" in conv_asm) == (h == 8)


def test_gathered_kernels_compile_to_pair_multiply_adds_for_haswell():
    """On any host: built for an AVX2-only CPU the kernels run in ymm (8 lanes) with vpmaddubsw + vpmaddwd for the
    vpdpbusd, the 4 vectors' inputs interleaved by unpacks; no AVX-512 instruction (it would be SIGILL there)."""
    import dataclasses

    import tvm

    from unsparse_tvm.ops import sparse_int8_gathered as g
    from unsparse_tvm.ops.geometry import ConvGeometry
    from unsparse_tvm.ops.int8_formats import ActQuant

    haswell = cpu_target("haswell")
    assert g.gather_lanes(haswell) == 8 and g.gather_lanes(cpu_target("znver4")) == 16
    assert g.gather_lanes(cpu_target("skylake-avx512")) == 0  # AVX-512 without VNNI keeps the quads
    rng = np.random.default_rng(4)
    for h, patches in ((4, True), (8, True), (16, False)):
        geo = dataclasses.replace(ConvGeometry(1, 32, h, h, 16, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1)), patches=patches)
        wq = np.where(rng.random((16, 32, 3, 3)) < 0.1, rng.integers(-127, 128, (16, 32, 3, 3)), 0).astype(np.int8)
        plan = g.plan(geo, 8)
        rows = g.gathered_rows(wq, geo, plan.tile)
        conv = g.gathered_conv(1, plan.input_length(geo), rows, plan.q, plan.unroll,
                               g.WriteBack(patches, True, ActQuant(0.1, 0, 127) if patches else None), lanes=8)
        asm = tvm.compile(tvm.IRModule({"conv": conv.with_attr("global_symbol", "conv")}),
                          target=haswell).mod.inspect_source("asm")
        assert "vpmaddubsw" in asm and "vpmaddwd" in asm and "%ymm" in asm, h
        assert "%zmm" not in asm and "vpdpbusd" not in asm and "vpermb" not in asm, h
        assert (plan.unroll == 4) == (h != 4) and ("vpunpcklbw" in asm and "vpunpckhwd" in asm) == (h != 4), h


def test_without_vnni_scattered_convs_stay_fp32_and_say_so(monkeypatch, capsys):
    """AVX2 code (no VNNI): a conv whose int8 quads would hold under 2 nonzeros runs fp32 (there its int8 ran
    0.49-0.95x fp32), named in one note; quads that fill (channel4) still run int8. Compiled for Haswell on any
    host, run where the host has AVX2."""
    from unsparse_tvm.build import compile_program, print_report
    from unsparse_tvm.hostcpu import host_features
    from unsparse_tvm.models import export_program

    monkeypatch.setattr("unsparse_tvm.relay_passes.quantize_int8.SCATTERED_FP32", True)  # the suite turns it off
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(16 * 36, 4)).eval()
    shape = (1, 8, 6, 6)
    int8_ready(model, shape, 0.85)
    with torch.no_grad():  # the second conv in whole quads of 4 input channels (channel4): it stays int8
        w = model[2].weight
        quads = (torch.rand(16, 4, 1, 3, 3) < 0.3).expand(16, 4, 4, 3, 3).reshape(16, 16, 3, 3)
        w.copy_(w.abs().add(0.1) * quads.float())
    from unsparse_tvm.compress.calibrate import calibrate, calibration_batches

    ranges = calibrate(model, calibration_batches(shape, None, 2, 16))["layers"]
    compiled = compile_program(export_program(model, shape), cpu_target("haswell"), threshold=0.5,
                               activations=ranges)
    formats = _formats(compiled.report)
    assert formats["0"] != "int8q4" and formats["2"] == "int8q4", formats
    assert list(compiled.fp32_int8) == ["0"] and compiled.fp32_int8["0"] < 2
    print_report(compiled)
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "(0)" in notes[0] and "without VNNI" in notes[0]
    if "avx2" in host_features():
        import tvm
        from tvm import relax

        x = np.random.default_rng(6).standard_normal(shape).astype(np.float32)
        y = relax.VirtualMachine(compiled.executable, tvm.cpu())["main"](tvm.runtime.tensor(x))[0].numpy()
        ref = model(torch.from_numpy(x)).detach().numpy()
        assert np.abs(y - ref).max() <= 0.05 * np.abs(ref).max()  # int8 in the second conv: quantisation error


def test_layers_left_fp32_run_fp32_kernels_not_the_weight_quantised_ones(monkeypatch):
    """A model quantised to int8 weights and activations: the layers the int8 passes leave fp32 (AVX2 code,
    scattered quads) run the fp32 kernels on their weights' int8 values, not the
    weight-quantised ones (with AVX2 code those ran vgg16-cifar unstructured's in 1.95 ms against 1.73); the rest
    keeps its int8 weights. Compiled for Haswell on any host, run where the host has AVX2."""
    import unsparse_tvm
    from unsparse_tvm.hostcpu import host_features

    monkeypatch.setattr("unsparse_tvm.relay_passes.quantize_int8.SCATTERED_FP32", True)  # the suite turns it off
    torch.manual_seed(9)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                        nn.Flatten(), nn.Linear(16 * 36, 10)).eval()  # 6x6 maps: no gathered kernel takes them
    net = unsparse_tvm.prune(net, 0.9)
    with torch.no_grad():  # the second conv in whole quads of 4 input channels: it stays int8
        quads = (torch.rand(16, 4, 1, 3, 3) < 0.3).expand(16, 4, 4, 3, 3).reshape(16, 16, 3, 3)
        net[2].weight.copy_(net[2].weight.abs().add(0.1) * quads.float())
    x = torch.randn(1, 3, 6, 6)
    unsparse_tvm.quantize(net, "int8", activations="int8", calibration_data="random", example_input=x)
    monkeypatch.setenv("UNSPARSE_MCPU", "haswell")
    model = unsparse_tvm.compile(net, example_input=x, threshold=0.5)
    rows = {r["name"]: r for r in model.report}
    assert rows["2"]["format"] == rows["5"]["format"] == "int8q4", rows  # the linear: in lanes (any fill)
    assert not rows["0"]["format"].startswith("int8") and rows["0"]["precision"] == "fp32", rows["0"]  # fp32 values
    if "avx2" in host_features():
        with torch.no_grad():
            ref = net(x)
        assert float((model(x) - ref).abs().max() / ref.abs().max()) < 0.05


@pytest.mark.parametrize("c, h, w, k, pad, dtype", [(3, 15, 17, 7, 3, "float32"), (8, 16, 16, 3, 1, "uint8"),
                                                    (5, 9, 10, 3, 1, "float32")])
def test_phase_planes_hold_the_padded_input_by_phase(c, h, w, k, pad, dtype):
    """pad_phase_planes against numpy: padded input (y, x) at plane (y % 2, x % 2), row y // 2, column x // 2, the
    zero point elsewhere and in the channel past C; odd sizes; float32 quantised in it, or uint8 relayed."""
    import tvm

    from unsparse_tvm.ops.gathered_inputs import pad_phase_planes
    from unsparse_tvm.ops.geometry import ConvGeometry
    from unsparse_tvm.ops.int8_formats import ActQuant

    geo = ConvGeometry(1, c, h, w, 4, k, k, (2, 2), (pad,) * 4, (1, 1))
    act, channels = ActQuant(0.05, 3, 255), c + 1
    f = pad_phase_planes((1, c, h, w), dtype, geo, act, channels)
    lib = tvm.compile(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}), target=cpu_target(None))
    rng = np.random.default_rng(c)
    x = ((rng.standard_normal((1, c, h, w)) * 3).astype(np.float32) if dtype == "float32"
         else rng.integers(0, 256, (1, c, h, w)).astype(np.uint8))
    out = tvm.runtime.tensor(np.zeros((1, channels * geo.channel_plane), np.uint8))
    lib["main"](tvm.runtime.tensor(x), out)
    q = x if dtype == "uint8" else np.clip(np.round(x / 0.05) + 3, 0, 255).astype(np.uint8)
    padded = np.full((channels, geo.hq * 2, geo.wq * 2), 3, np.uint8)
    padded[:c, pad:pad + h, pad:pad + w] = q[0]
    want = np.stack([padded[:, py::2, px::2] for py in range(2) for px in range(2)], axis=1)
    np.testing.assert_array_equal(out.numpy().reshape(channels, 4, geo.hq, geo.wq), want)


def test_scattered_quads_on_an_fp32_input_stay_fp32(monkeypatch, capsys):
    """With VNNI: a scattered 1x1 (quads under 2 nonzeros) that the gathered kernel does not take (a 32x32 map)
    stays fp32 where its input comes from an fp32 layer (here a depthwise conv, as mobile networks' project convs:
    mobilenet_v2's ran 2x slower int8), named in the note; the same kind of conv fed uint8 by an int8 conv stays
    int8. Compiled for Zen 4 on any host; run and checked against PyTorch where the host has VNNI and VBMI."""
    from unsparse_tvm.build import compile_program, print_report
    from unsparse_tvm.compress.calibrate import calibrate, calibration_batches
    from unsparse_tvm.models import export_program

    monkeypatch.setattr("unsparse_tvm.relay_passes.quantize_int8.SCATTERED_FP32", True)  # the suite turns it off
    monkeypatch.setattr("unsparse_tvm.relay_passes.quantize_int8.FED_FP32", True)
    torch.manual_seed(11)
    model = nn.Sequential(nn.Conv2d(8, 32, 3, padding=1), nn.ReLU(),      # whole quads: int8
                          nn.Conv2d(32, 16, 1), nn.ReLU(),                # scattered, fed uint8 by 0: int8
                          nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.ReLU(),  # depthwise: fp32
                          nn.Conv2d(16, 8, 1), nn.ReLU()).eval()          # scattered, fed fp32: fp32
    shape = (1, 8, 32, 32)
    with torch.no_grad():
        quads = (torch.rand(32, 2, 1, 3, 3) < 0.3).expand(32, 2, 4, 3, 3).reshape(32, 8, 3, 3)
        model[0].weight.mul_(quads.float())
        for i in (2, 6):
            model[i].weight.mul_((torch.rand_like(model[i].weight) < 0.12).float())
    ranges = calibrate(model, calibration_batches(shape, None, 2, 16))["layers"]
    compiled = compile_program(export_program(model, shape), cpu_target("znver4"), threshold=0.5, activations=ranges)
    formats = _formats(compiled.report)
    assert formats["0"] == "int8q4" and formats["2"] == "int8q4", formats
    assert not formats["6"].startswith("int8") and list(compiled.fp32_int8) == ["6"], (formats, compiled.fp32_int8)
    print_report(compiled)
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:") and "(6)" in line]
    assert len(notes) == 1 and "on an fp32 input" in notes[0], notes
    monkeypatch.setattr("unsparse_tvm.relay_passes.quantize_int8.FED_FP32", False)  # the negative control
    control = compile_program(export_program(model, shape), cpu_target("znver4"), threshold=0.5, activations=ranges)
    assert _formats(control.report)["6"] == "int8q4" and not control.fp32_int8
    from unsparse_tvm.target import runnable_here

    if runnable_here(cpu_target("znver4")) is None:  # (None: this CPU runs Zen 4's code)
        import tvm
        from tvm import relax

        x = np.random.default_rng(12).standard_normal(shape).astype(np.float32)
        y = relax.VirtualMachine(compiled.executable, tvm.cpu())["main"](tvm.runtime.tensor(x))[0].numpy()
        ref = model(torch.from_numpy(x)).detach().numpy()
        assert np.abs(y - ref).max() <= 0.05 * np.abs(ref).max()


class Gated(nn.Module):
    """A squeeze-excitation gate, x * sigmoid(fc(mean(x))), feeding a gathered 1x1 that reduces channels on 14x14."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(16, 64, 3, padding=1)
        self.fc = nn.Conv2d(64, 64, 1)
        self.project = nn.Conv2d(64, 16, 1)

    def forward(self, x):                                        # x [N, 16, 14, 14]
        y = torch.relu(self.conv(x))                             # [N, 64, 14, 14]
        g = torch.sigmoid(self.fc(y.mean((2, 3), keepdim=True)))  # [N, 64, 1, 1]
        return torch.relu(self.project(y * g))                   # [N, 16, 14, 14]


@pytest.mark.skipif(not _gathers_here(), reason="the host lacks AVX-512 VNNI or VBMI")
@pytest.mark.parametrize("batch", [1, 2])
def test_gate_applied_in_the_pad_stage(batch, llvm, monkeypatch):
    """The gate's product is computed in the gathered 1x1's pad stage (_gathered_int8.GATE), no pass of its own:
    the same outputs bit for bit as with the product computed first (the negative control), a per-image gate at
    batch 2, and within int8's error of PyTorch."""
    import tvm

    from unsparse_tvm.frontend import import_program
    from unsparse_tvm.models import export_program
    from unsparse_tvm.relay_passes import build_pipeline

    torch.manual_seed(21 + batch)
    model = Gated().eval()
    shape = (batch, 16, 14, 14)
    ranges = int8_ready(model, shape, 0.85)
    report, run = compile_int8(model, shape, ranges, llvm)
    assert _formats(report)["project"] == "int8g4", _formats(report)
    mod, names = import_program(export_program(model, shape))
    with llvm:
        int8 = build_pipeline(llvm, names=names, activations=ranges, stop_after="int8")(mod).script()
    assert "R.multiply" not in int8 and int8.count("R.sigmoid") == 1
    monkeypatch.setattr("unsparse_tvm.relay_passes._gathered_int8.GATE", False)
    _, plain = compile_int8(model, shape, ranges, llvm)
    x = np.random.default_rng(batch).standard_normal(shape).astype(np.float32)
    np.testing.assert_array_equal(run(x), plain(x))
    ref = model(torch.from_numpy(x)).detach().numpy()
    assert np.abs(run(x) - ref).max() <= 0.05 * np.abs(ref).max() and np.abs(ref).max() > 0
