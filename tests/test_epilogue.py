"""The epilogue pass of a sparse conv whose output is not its flat domain (a padded 3x3: rows Wq = OW + 2
apart; hyb: two producers). Rows without a 4-lane vector in them (14- and 7-wide maps) run per row in whole
vectors and a short one: fused over (y, x) they ran in 4-lane vectors whose flat index y*Wq + x needed a
division by OW per lane (schedules._common.schedule_epilogue_cpu)."""

import re

import numpy as np
import pytest

from conftest import cpu_target, rel_err, run_layer, sparse_weight, torch_conv
from unsparse_tvm.single_layer import LayerSpec


def _spec(size: int, batch: int, rng: np.random.Generator):
    weight = sparse_weight((24, 8, 3, 3), 0.9, rng, empty_rows=2, dense_rows=1)
    bias = rng.standard_normal(24).astype(np.float32)
    spec = LayerSpec("conv2d", (batch, 8, size, size), weight, bias, True,
                     {"strides": [1, 1], "padding": [1] * 4, "dilation": [1, 1], "groups": 1})
    return spec, weight, bias


def _epilogue_text(spec, target) -> str:
    from unsparse_tvm.relay_passes import build_pipeline
    from unsparse_tvm.single_layer import layer_module

    mod = build_pipeline(target, threshold=0.5, fmt="hyb", stop_after="schedule")(layer_module(spec))
    text = mod["sparse_conv2d"].script()
    return text[text.index('T.sblock("epilogue'):]  # the last stage


@pytest.mark.parametrize("size,lanes", [(14, 8), (7, 4), (6, 4)])
@pytest.mark.parametrize("mcpu", [None, "haswell"])
def test_narrow_rows_run_in_vectors_without_division(size, lanes, mcpu, llvm):
    """Scheduled IR (any host): per row, `lanes` wide vectors and a short tail; no index divided by OW."""
    target = cpu_target(mcpu) if mcpu else llvm
    spec, _, _ = _spec(size, 1, np.random.default_rng(size))
    text = _epilogue_text(spec, target)
    widths = [int(m) for m in re.findall(r"T\.vectorized\(T\.int64\((\d+)\)\)", text)]
    assert lanes in widths, text
    assert f"// T.int64({size})" not in text and f"% T.int64({size})" not in text, text


@pytest.mark.parametrize("size,batch", [(14, 1), (7, 2), (6, 1), (16, 1)])
def test_epilogue_pass_matches_torch(size, batch, llvm):
    """hyb's epilogue pass (bias, ReLU, the overflow rows added) on 14, 7, 6 and 16 wide maps, batch 1 and 2."""
    rng = np.random.default_rng(100 + size)
    spec, weight, bias = _spec(size, batch, rng)
    x = rng.standard_normal(spec.input_shape).astype(np.float32)
    y, report = run_layer(spec, llvm, threshold=0.5, fmt="hyb", x=x)
    assert report[0].format == "hyb"
    assert rel_err(y, torch_conv(x, weight, bias, (1, 1), (1, 1, 1, 1), (1, 1), relu=True)) < 1e-5
