"""Quantisation: exact zeros, level sets (int / k-means codebook / powers of two), metadata round trip."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from unsparse_tvm.compress.data import load_dataset
from unsparse_tvm.errors import UnsparseError
from unsparse_tvm.models import build_model
from unsparse_tvm.compress.masks import magnitude_prune, prunable_parameters
from unsparse_tvm.compress.prune import prune_model
from unsparse_tvm.compress.config import PruneConfig
from unsparse_tvm.compress.quantize import fit_codebook, linear_quantize, parse_scheme, pow2_quantize, quantize_command, quantize_model
from unsparse_tvm.frontend import QUANT_FILE, read_quantization
from unsparse_tvm.frontend import MODEL_META, load_model, save_model


def pruned_weight(shape=(32, 16, 3, 3), sparsity=0.7, seed=0) -> torch.Tensor:
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    w[w.abs() < w.abs().flatten().kthvalue(int(sparsity * w.numel())).values] = 0
    return w


@pytest.mark.parametrize("scheme, expected", [
    ("int8", ("linear", 8)), ("int4", ("linear", 4)), ("int2", ("linear", 2)),
    ("kmeans4", ("kmeans", 4)), ("kmeans8", ("kmeans", 8)), ("pow2", ("pow2", 4)),
])
def test_parse_scheme(scheme, expected):
    assert parse_scheme(scheme) == expected


@pytest.mark.parametrize("scheme, message", [
    ("int9", "bits must be between 2 and 8"), ("int16", "bits must be between 2 and 8"),
    ("kmeans1", "bits must be between 2 and 8"), ("kmeans12", "bits must be between 2 and 8"),
    ("fp8", "unknown quantisation scheme"), ("kmeans", "unknown quantisation scheme"), ("", "unknown"),
])
def test_scheme_errors(scheme, message):
    with pytest.raises(UnsparseError, match=message):
        parse_scheme(scheme)


@pytest.mark.parametrize("bits", [8, 4])
def test_linear_per_channel_levels_and_exact_zeros(bits):
    w = pruned_weight()
    wq, scale = linear_quantize(w, bits)
    qmax = 2 ** (bits - 1) - 1
    assert scale.shape == (32,)
    assert torch.equal(wq == 0, w == 0)  # zeros stay zero, nonzeros stay nonzero
    q = wq / scale.view(-1, 1, 1, 1)
    assert torch.allclose(q, q.round(), atol=1e-4) and float(q.abs().max()) <= qmax + 1e-4
    assert torch.allclose(scale, w.abs().reshape(32, -1).amax(1) / qmax)
    for c in range(32):  # at most 2*qmax values per channel besides zero
        assert len(torch.unique(wq[c][wq[c] != 0])) <= 2 * qmax
    big = w.abs() >= scale.view(-1, 1, 1, 1) / 2  # where rounding to nearest applies, error <= scale/2
    err = (wq - w).abs() / scale.view(-1, 1, 1, 1)
    assert float(err[big].max()) <= 0.5 + 1e-5


@pytest.mark.parametrize("bits", [2, 4, 6])
def test_kmeans_codebook_size_and_exact_zeros(bits):
    w = pruned_weight(seed=bits)
    model = torch.nn.Sequential(torch.nn.Conv2d(16, 32, 3))
    with torch.no_grad():
        model[0].weight.copy_(w)
    quant = quantize_model(model, f"kmeans{bits}")
    entry = quant["layers"]["0.weight"]
    wq = model[0].weight.detach()
    assert len(entry["codebook"]) <= 2**bits
    assert torch.equal(wq == 0, w == 0)
    assert set(torch.unique(wq[wq != 0]).tolist()) <= set(torch.tensor(entry["codebook"]).tolist())
    # more levels, less error
    assert float((wq - w).abs().mean()) < float(w.abs().mean()) / 2 ** (bits - 1)


@pytest.mark.parametrize("scheme", ["int4", "kmeans4", "pow2"])
def test_an_all_zero_layer_stays_zero(scheme):
    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    with torch.no_grad():
        model[0].weight.zero_()
    quantize_model(model, scheme)
    assert torch.equal(model[0].weight, torch.zeros(3, 4))


def test_kmeans_codebook_with_few_distinct_values_is_exact():
    w = torch.tensor([0.0, 1.0, -1.0, 2.0, 0.0, 1.0])
    assert fit_codebook(w, 4).tolist() == [-1.0, 1.0, 2.0]


def test_pow2_values_are_signed_powers_of_two_times_the_scale():
    w = pruned_weight(seed=3)
    wq, scale, emin = pow2_quantize(w)
    assert emin == -7 and scale == float(w.abs().max())
    assert torch.equal(wq == 0, w == 0)
    ratio = (wq[wq != 0] / scale).abs()
    exps = torch.log2(ratio)
    assert torch.equal(exps, exps.round()) and float(exps.min()) >= emin and float(exps.max()) <= 0
    assert torch.equal(torch.sign(wq[w != 0]), torch.sign(w[w != 0]))
    # nearest in the linear domain: 0.74 -> 0.5, 0.76 -> 1
    small, _, _ = pow2_quantize(torch.tensor([1.0, 0.74, 0.76, -0.3, 0.0]))
    assert small.tolist() == [1.0, 0.5, 1.0, -0.25, 0.0]


def test_quantize_model_keeps_pruned_zeros_and_describes_every_layer():
    net = magnitude_prune(build_model("smallcnn"), 0.8)
    zeros = {n: (o.weight == 0).clone() for n, o, _ in prunable_parameters(net)}
    quant = quantize_model(net, "int4")
    assert quant["scheme"] == "int4" and quant["bits"] == 4 and set(quant["layers"]) == set(zeros)
    for n, o, _ in prunable_parameters(net):
        assert torch.equal(o.weight == 0, zeros[n])
        assert len(quant["layers"][n]["scales"]) == o.weight.shape[0]


def test_straight_through_fine_tuning_ends_on_the_grid():
    data = load_dataset("digits")
    data.x_train, data.y_train = data.x_train[:256], data.y_train[:256]  # one short epoch
    net = build_model("smallcnn")
    prune_model(net, PruneConfig(sparsity=0.6, method="vector"))
    zeros = {n: (o.weight == 0).clone() for n, o, _ in prunable_parameters(net)}
    before = {n: o.weight.detach().clone() for n, o, _ in prunable_parameters(net)}
    quant = quantize_model(net, "kmeans3", data, epochs=1, lr=1e-2)
    for n, o, _ in prunable_parameters(net):
        w = o.weight.detach()
        assert not any(isinstance(m, torch.nn.utils.parametrize.ParametrizationList) for m in o.modules())
        assert torch.equal(w == 0, zeros[n])
        assert set(torch.unique(w[w != 0]).tolist()) <= set(quant["layers"][n]["codebook"])
        assert len(quant["layers"][n]["codebook"]) <= 8
    changed = sum(not torch.equal(torch.sort(torch.unique(before[n]))[0], torch.unique(o.weight.detach()))
                  for n, o, _ in prunable_parameters(net))
    assert changed  # training did move the weights


def test_quantisation_round_trips_through_the_pt2(tmp_path):
    loaded = load_model("smallcnn")
    magnitude_prune(loaded.module, 0.5)
    quant = quantize_model(loaded.module, "kmeans4")
    path = str(tmp_path / "q.pt2")
    ep = save_model(loaded, path, quant=quant)
    assert read_quantization(path) == json.loads(json.dumps(quant))
    extra = {QUANT_FILE: "", MODEL_META: ""}
    reloaded = torch.export.load(path, extra_files=extra)  # torch's own reader sees the same file
    assert json.loads(extra[QUANT_FILE]) == read_quantization(path)
    assert json.loads(extra[MODEL_META])["model"] == "smallcnn"
    w = reloaded.state_dict["features.2.weight"]
    assert set(torch.unique(w[w != 0]).tolist()) <= set(read_quantization(path)["layers"]["features.2.weight"]["codebook"])
    assert torch.equal(w, ep.state_dict["features.2.weight"])
    plain = str(tmp_path / "plain.pt2")
    torch.export.save(ep, plain)
    assert read_quantization(plain) is None


def test_read_quantization_errors(tmp_path):
    with pytest.raises(UnsparseError, match="no such file"):
        read_quantization(str(tmp_path / "missing.pt2"))
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(UnsparseError, match="not a .pt2"):
        read_quantization(str(tmp_path / "notes.txt"))
    (tmp_path / "bad.pt2").write_text("not a zip")
    with pytest.raises(UnsparseError, match="could not be read"):
        read_quantization(str(tmp_path / "bad.pt2"))


def test_quantize_command_refuses_bad_input_and_leaves_files_alone(tmp_path):
    src = str(tmp_path / "in.pt2")
    save_model(load_model("smallcnn"), src)
    digest = hashlib.sha256(open(src, "rb").read()).hexdigest()
    out = tmp_path / "out.pt2"
    out.write_bytes(b"keep me")
    with pytest.raises(UnsparseError, match="--force"):
        quantize_command(src, "int8", str(out))
    with pytest.raises(UnsparseError, match="bits must be"):
        quantize_command(src, "int9", str(tmp_path / "new.pt2"))
    with pytest.raises(UnsparseError, match="is the input"):
        quantize_command(src, "int8", src, overwrite=True)
    with pytest.raises(UnsparseError, match="needs a data set"):
        quantize_command(src, "int8", str(tmp_path / "new.pt2"), epochs=2)
    assert out.read_bytes() == b"keep me" and not (tmp_path / "new.pt2").exists()
    report = quantize_command(src, "pow2", str(tmp_path / "new.pt2"), report=str(tmp_path / "r.json"), log=lambda *a: None)
    assert hashlib.sha256(open(src, "rb").read()).hexdigest() == digest
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["accuracy_before"] is None and saved["accuracy_after"] is None and len(saved["layers"]) == 5
    fp = saved["footprint"]
    assert fp["sparse_quant_bytes"] == sum(r["sparse_quant_bytes"] for r in saved["layers"])
    # dense weights in a CSR-like format: 4-bit values + 2-byte indices, vs 4-byte values + the same indices
    assert fp["sparse_quant_bytes"] < fp["sparse_fp32_bytes"] and fp["sparse_fp32_bytes"] > fp["dense_fp32_bytes"]
    assert report["layers"][0]["quant"].startswith("pow2")
