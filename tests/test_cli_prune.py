"""`unsparse-tvm train | prune | quantize | inspect`: the chain through .pt2 files, reports, one-line errors."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
import torch.nn as nn

from unsparse_tvm.cli import main
from unsparse_tvm.errors import UnsparseError
from unsparse_tvm.compress.report import describe_program
from unsparse_tvm.models import export_program

from conftest import assert_one_line_error
from test_data import write_cifar


def run(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:  # a value refused at parse time (argparse)
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> str:
    """smallcnn trained on digits for a few epochs (about 2 s)."""
    path = tmp_path_factory.mktemp("trained") / "dense.pt2"
    assert main(["train", "smallcnn", "--dataset", "digits", "--epochs", "12", "-o", str(path)]) == 0
    return str(path)


def test_one_shot_default_needs_no_data_set(tmp_path, capsys):
    code, out, _ = run(capsys, "prune", "vgg16-cifar", "--sparsity", "0.9", "-o", tmp_path / "x.pt2")
    assert code == 0 and "wrote" in out
    assert "classifier.2.weight" in out and "unstructured" in out
    ep = torch.export.load(tmp_path / "x.pt2")
    w = ep.state_dict["features.0.weight"]
    assert abs(float((w == 0).float().mean()) - 0.9) < 0.01


def test_train_prune_quantize_inspect_chain(trained, tmp_path, capsys):
    code, out, _ = run(capsys, "prune", trained, "--method", "vector", "--vector-size", "4", "--sparsity", "0.75",
                       "--dataset", "digits", "--epochs", "6", "--first-layer-sparsity", "0.5",
                       "-o", tmp_path / "v.pt2", "--report", tmp_path / "v.json")
    assert code == 0, out
    rep = json.loads((tmp_path / "v.json").read_text())
    assert {"accuracy_before", "accuracy_after", "layers"} <= set(rep)
    assert rep["accuracy_before"] > 90 and rep["accuracy_after"] > rep["accuracy_before"] - 3
    assert abs(rep["overall_sparsity"] - 0.75) < 0.01
    first = rep["layers"][0]
    assert first["target_sparsity"] == 0.5 and abs(first["sparsity"] - 0.5) < 0.05
    assert {r["pattern"] for r in rep["layers"][1:]} <= {"vector-4", "mixed-4/8", "mixed-4/16"}
    for r in rep["layers"]:
        assert r["sparse_fp32_bytes"] < r["dense_fp32_bytes"] and r["sparse_quant_bytes"] < r["sparse_fp32_bytes"]
    code, out, _ = run(capsys, "quantize", tmp_path / "v.pt2", "--scheme", "int8", "--dataset", "digits",
                       "-o", tmp_path / "q.pt2", "--report", tmp_path / "q.json")
    assert code == 0
    q = json.loads((tmp_path / "q.json").read_text())
    assert q["accuracy_before"] == rep["accuracy_after"]  # the .pt2 round trip loses nothing
    assert abs(q["accuracy_after"] - q["accuracy_before"]) <= 1.0
    assert [r["sparsity"] for r in q["layers"]] == [r["sparsity"] for r in rep["layers"]]
    code, out, _ = run(capsys, "inspect", tmp_path / "q.pt2")
    assert code == 0
    assert "quantisation: int8" in out and "vector-4" in out and "int8/channel" in out
    assert "pruned: vector V=4 to 0.75, gradual over 6 epochs" in out


def test_training_a_pruned_model_keeps_it_pruned(trained, tmp_path, capsys):
    assert run(capsys, "prune", trained, "--method", "block", "--sparsity", "0.6", "-o", tmp_path / "b.pt2")[0] == 0
    assert run(capsys, "train", tmp_path / "b.pt2", "--dataset", "digits", "--epochs", "2", "-o", tmp_path / "t.pt2")[0] == 0
    before = torch.export.load(tmp_path / "b.pt2").state_dict
    after = torch.export.load(tmp_path / "t.pt2").state_dict
    w0, w1 = before["features.5.weight"], after["features.5.weight"]
    assert torch.equal(w0 == 0, w1 == 0) and not torch.equal(w0, w1)


@pytest.mark.parametrize("method, pattern", [("unstructured", "unstructured"), ("mixed", "mixed-4/8")])
def test_fast_gradual_prune_keeps_accuracy(trained, tmp_path, capsys, method, pattern):
    code, _, _ = run(capsys, "prune", trained, "--method", method, "--sparsity", "0.8", "--dataset", "digits",
                     "--epochs", "20", "-o", tmp_path / "p.pt2", "--report", tmp_path / "p.json")
    assert code == 0
    rep = json.loads((tmp_path / "p.json").read_text())
    assert rep["accuracy_after"] >= rep["accuracy_before"] - 3.0
    assert pattern in {r["pattern"] for r in rep["layers"]}


def test_global_scope_and_sensitivity(trained, tmp_path, capsys):
    code, _, _ = run(capsys, "prune", trained, "--scope", "global", "--sparsity", "0.8", "-o", tmp_path / "g.pt2",
                     "--report", tmp_path / "g.json")
    assert code == 0
    layers = json.loads((tmp_path / "g.json").read_text())["layers"]
    assert len({round(r["sparsity"], 2) for r in layers}) > 1  # one ranking: layers end up different
    code, out, _ = run(capsys, "prune", trained, "--sensitivity", "--sparsity", "0.8", "--dataset", "digits",
                       "-o", tmp_path / "s.pt2", "--report", tmp_path / "s.json")
    assert code == 0 and "sensitivity scan" in out
    rep = json.loads((tmp_path / "s.json").read_text())
    assert len(rep["sensitivity"]) == 5 and abs(rep["overall_sparsity"] - 0.8) < 0.01
    assert len({r["target_sparsity"] for r in rep["layers"]}) > 1


def test_weights_state_dict_for_a_builtin_model(trained, tmp_path, capsys):
    from unsparse_tvm.frontend import load_model

    torch.save(load_model(trained).module.state_dict(), tmp_path / "w.pt")
    code, out, _ = run(capsys, "prune", "smallcnn", "--weights", tmp_path / "w.pt", "--sparsity", "0.5",
                       "--dataset", "digits", "-o", tmp_path / "p.pt2", "--report", tmp_path / "p.json")
    assert code == 0 and "random weights" not in out
    assert json.loads((tmp_path / "p.json").read_text())["accuracy_before"] > 90


def test_foreign_pt2_one_shot(tmp_path, capsys):
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 5))
    torch.export.save(export_program(net, (2, 3, 8, 8)), tmp_path / "f.pt2")
    code, _, _ = run(capsys, "prune", tmp_path / "f.pt2", "--method", "block", "--block-size", "2",
                     "--sparsity", "0.5", "-o", tmp_path / "p.pt2")
    assert code == 0
    code, _, _ = run(capsys, "quantize", tmp_path / "p.pt2", "--scheme", "kmeans3", "-o", tmp_path / "q.pt2")
    assert code == 0
    text = describe_program(str(tmp_path / "q.pt2"))
    assert "block-2" in text and "kmeans3" in text and "[2, 3, 8, 8]" in text
    assert_one_line_error(["prune", tmp_path / "f.pt2", "--sparsity", "0.5", "--dataset", "digits", "--epochs", "1",
                           "-o", tmp_path / "t.pt2"], capsys, "cannot be fine-tuned")


@pytest.mark.slow
def test_tiny_cifar_through_vgg16_cifar(tmp_path, capsys):
    write_cifar(tmp_path / "c10", n_train=(8,), n_test=4)
    code, out, _ = run(capsys, "prune", "vgg16-cifar", "--sparsity", "0.5", "--dataset", f"cifar10:{tmp_path / 'c10'}",
                       "--epochs", "1", "--batch-size", "4", "-o", tmp_path / "v.pt2", "--report", tmp_path / "v.json")
    assert code == 0 and "random weights" in out
    rep = json.loads((tmp_path / "v.json").read_text())
    assert rep["dataset"] == "cifar10" and rep["accuracy_after"] is not None and abs(rep["overall_sparsity"] - 0.5) < 0.01


@pytest.mark.parametrize("extra, message", [
    (["--sparsity", "1.0"], "[0, 0.99]"),
    (["--sparsity", "-0.2"], "[0, 0.99]"),
    (["--sparsity", "0.5", "--method", "channel"], "unknown pruning method"),
    (["--sparsity", "0.5", "--method", "vector", "--vector-size", "3"], "vector size"),
    (["--sparsity", "0.5", "--dataset", "digits", "--epochs", "1", "--method", "block", "--block-size", "6"], "block size"),
    (["--sparsity", "0.5", "--epochs", "2"], "need a data set"),
    (["--sparsity", "0.5", "--dataset", "cifar10:/no/such/dir"], "does not exist"),
    (["--sparsity", "0.5", "--dataset", "imagenet"], "unknown data set"),
    (["--sparsity", "0.5", "--dataset", "digits", "--scope", "global", "--method", "vector"], "unstructured"),
])
def test_prune_errors_are_one_line(tmp_path, capsys, extra, message):
    assert_one_line_error(["prune", "smallcnn", *extra, "-o", tmp_path / "o.pt2"], capsys, message)
    assert not (tmp_path / "o.pt2").exists()


def test_dataset_in_the_wrong_format(tmp_path, capsys):
    write_cifar(tmp_path / "c10")
    (tmp_path / "c10" / "test_batch").write_text("not a pickle")
    assert_one_line_error(["prune", "vgg16-cifar", "--sparsity", "0.5", "--dataset", f"cifar10:{tmp_path / 'c10'}",
                           "-o", tmp_path / "o.pt2"], capsys, "not a CIFAR-10 python batch")
    err = assert_one_line_error(["prune", "smallcnn", "--sparsity", "0.5", "--dataset", f"cifar10:{tmp_path / 'c10'}",
                                 "-o", tmp_path / "o.pt2"], capsys)
    assert "not a CIFAR-10" in err or "shape" in err


def test_dataset_that_does_not_fit_the_model(tmp_path, capsys):
    write_cifar(tmp_path / "c10")
    assert_one_line_error(["prune", "smallcnn", "--sparsity", "0.5", "--dataset", f"cifar10:{tmp_path / 'c10'}",
                           "-o", tmp_path / "o.pt2"], capsys, "takes inputs of shape [1, 8, 8]")


def test_quantize_errors_are_one_line(tmp_path, capsys):
    assert_one_line_error(["quantize", "smallcnn", "--scheme", "fp8", "-o", tmp_path / "o.pt2"], capsys,
                          "unknown quantisation scheme")
    for scheme in ("kmeans9", "int1"):
        assert_one_line_error(["quantize", "smallcnn", "--scheme", scheme, "-o", tmp_path / "o.pt2"], capsys,
                              "bits must be between 2 and 8")


def test_model_with_no_prunable_layer(tmp_path, capsys):
    torch.export.save(export_program(nn.Sequential(nn.MaxPool2d(2), nn.ReLU()), (1, 3, 8, 8)), tmp_path / "pool.pt2")
    assert_one_line_error(["prune", tmp_path / "pool.pt2", "--sparsity", "0.5", "-o", tmp_path / "o.pt2"], capsys,
                          "no conv2d or linear layer")
    assert_one_line_error(["quantize", tmp_path / "pool.pt2", "--scheme", "int8", "-o", tmp_path / "o.pt2"], capsys,
                          "no conv2d or linear layer")
    assert not (tmp_path / "o.pt2").exists()


def test_outputs_and_inputs_are_protected(trained, tmp_path, capsys):
    digest = sha(trained)
    out = tmp_path / "exists.pt2"
    out.write_bytes(b"precious")
    assert_one_line_error(["prune", trained, "--sparsity", "0.5", "-o", out], capsys, "--force")
    assert_one_line_error(["quantize", trained, "--scheme", "int8", "-o", out], capsys, "--force")
    assert_one_line_error(["train", "smallcnn", "--dataset", "digits", "--epochs", "1", "-o", out], capsys,
                          "--force")
    assert out.read_bytes() == b"precious"
    report = tmp_path / "r.json"
    report.write_text("{}")
    assert_one_line_error(["prune", trained, "--sparsity", "0.5", "-o", tmp_path / "n.pt2", "--report", report], capsys,
                          "--force")
    assert_one_line_error(["prune", trained, "--sparsity", "0.5", "-o", trained, "--force"], capsys, "is the input")
    assert_one_line_error(["prune", trained, "--sparsity", "0.5", "-o", tmp_path / "n.onnx"], capsys,
                          "must end in .pt2")
    assert run(capsys, "prune", trained, "--sparsity", "0.5", "-o", out, "--force")[0] == 0
    assert out.read_bytes() != b"precious" and sha(trained) == digest


def test_train_errors(tmp_path, capsys):
    assert_one_line_error(["train", "smallcnn", "--epochs", "2", "-o", tmp_path / "t.pt2"], capsys, "needs --dataset")
    assert_one_line_error(["train", "lenet", "--dataset", "digits", "--epochs", "1", "-o", tmp_path / "t.pt2"], capsys,
                          "unknown model")
    assert_one_line_error(["train", "smallcnn", "--dataset", "digits", "--epochs", "1", "--weights", __file__,
                           "-o", tmp_path / "t.pt2"], capsys, "not a state_dict")
    torch.save({"features.0.weight": torch.zeros(3)}, tmp_path / "w.pt")
    assert_one_line_error(["train", "smallcnn", "--dataset", "digits", "--epochs", "1", "--weights", tmp_path / "w.pt",
                           "-o", tmp_path / "t.pt2"], capsys, "do not fit SmallCNN")


def test_inspect_errors(tmp_path, capsys):
    assert_one_line_error(["inspect", tmp_path / "missing.pt2"], capsys, "no such file")
    (tmp_path / "notes.txt").write_text("x")
    assert_one_line_error(["inspect", tmp_path / "notes.txt"], capsys, "not a .pt2")
    (tmp_path / "bad.pt2").write_text("x")
    assert_one_line_error(["inspect", tmp_path / "bad.pt2"], capsys, "could not be read")
    with pytest.raises(UnsparseError):
        describe_program(str(tmp_path / "missing.pt2"))
