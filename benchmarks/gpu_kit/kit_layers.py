"""The per-layer groups (default knobs and the knob grid): every kernel checked against PyTorch CUDA,
then timed next to cuDNN FP32, TF32 and FP16 (a mixin of run.Run)."""

from __future__ import annotations

import numpy as np

from kit_check import CHECK_RTOL, rel_error, rotation_count
from kit_weights import emulate_sparse, pack_layer, structure_hash, torch_layer_fn


class LayerRuns:
    def run_layers(self, g: dict, section: str):
        import torch

        model, sparsity, batch = g["model"], g["sparsity"], g["batch"]
        _, folded = self.weights(model, sparsity)
        layers = self.manifest["models"][model]["layers"]
        no_load = g.get("file") is None or (self.dry and not self.result["runtime"].get("driver"))
        mod = None if no_load else self.module(g["file"])
        by_layer = {}
        for k in g["kernels"]:
            by_layer.setdefault(k["layer"], []).append(k)
        for li, kernels in by_layer.items():
            layer = layers[li]
            where = f"{g['name']}/layer{li}"
            w, b = folded[li]
            packed = pack_layer(layer, w, b, batch)
            arrays = packed["arrays"]
            kinfo = kernels[0]
            shapes = {r: list(arrays[r].shape) for r in kinfo["args"][1:] if r in arrays}
            if packed["fmt"] != kinfo["fmt"] or shapes != {r: kinfo["shapes"][r] for r in shapes} or \
                    set(kinfo["args"][1:]) - set(arrays):
                self.error(where, f"regenerated weights do not fit the kernel (format {packed['fmt']} vs "
                                  f"{kinfo['fmt']}, shapes {shapes} vs {kinfo['shapes']}): not run")
                continue
            same = structure_hash(arrays) == kinfo["structure"]
            in_shape = [batch] + list(layer["input_shape"][1:])
            out_shape = kinfo["out_shape"]
            gen = torch.Generator().manual_seed(1000 + li)
            nsets = rotation_count(int(np.prod(in_shape)) * 4, self.l2)
            xs = [torch.randn(*in_shape, generator=gen) for _ in range(nsets)]
            wt, bt = torch.from_numpy(w), (torch.from_numpy(b) if b is not None else None)
            ref_fn = torch_layer_fn(layer, wt.to(self.tdev), bt.to(self.tdev) if bt is not None else None)
            xd = [x.to(self.tdev) for x in xs]
            row = {"model": model, "layer": li, "name": layer["name"], "op": layer["op"], "sparsity": sparsity,
                   "batch": batch, "weight_shape": layer["weight_shape"], "input_shape": in_shape,
                   "fmt": packed["fmt"], "ell_width": kinfo["shapes"]["data"][1], "same_structure_as_build": same,
                   "nnz": int((w != 0).sum()), "kernels": []}
            spatial = int(np.prod(out_shape[2:])) if layer["op"] == "conv2d" else 1
            light = self.dry and 2 * row["nnz"] * spatial * batch > self.args.emulate_max_flops
            if light:  # a CPU machine: the large layers' references would only cost time
                row["dry_run_note"] = "large layer: no CPU reference, emulation or baseline timing"
            else:
                with torch.no_grad():
                    ref = ref_fn(xd[0])
            if self.dry and not light:
                emulated = torch.from_numpy(emulate_sparse(layer, packed, xs[0].numpy(), batch))
                row["emulated_rel_err"] = rel_error(emulated, ref)
                if row["emulated_rel_err"] > CHECK_RTOL["layer"]:
                    self.error(where, f"packed arrays do not reproduce the layer (rel err {row['emulated_rel_err']:.2e})")
            dev_arrays = {r: torch.from_numpy(np.ascontiguousarray(a)).to(self.tdev) for r, a in arrays.items()}
            out = torch.empty(out_shape, device=self.tdev)
            for k in kernels:
                entry = {"func": k["func"], "config": k["config"], "variant": k["variant"]}
                if k.get("same_as"):
                    entry["same_as"] = k["same_as"]
                    row["kernels"].append(entry)
                    continue
                try:
                    if "build_error" in k:
                        raise RuntimeError(f"not built: {k['build_error']}")
                    f = mod[k["func"]] if mod is not None else None
                    args = [self.to_tvm(dev_arrays[r]) for r in k["args"][1:]]
                    xs_k = [x.reshape(k["x_shape"]) for x in xd] if "x_shape" in k else xd  # the pass's flat view
                    sets = [[self.to_tvm(x)] + args + [self.to_tvm(out)] for x in xs_k]  # rotated inputs
                    if self.dry:  # everything but the launch: function found, operands converted
                        entry["loaded"] = f is not None
                        row["kernels"].append(entry)
                        continue
                    out.fill_(float("nan"))
                    f(*sets[0])
                    torch.cuda.synchronize()
                    entry["rel_err"] = rel_error(out, ref)
                    if entry["rel_err"] > CHECK_RTOL["layer"]:
                        entry["error"] = "wrong result: not timed"
                    elif not self.args.profile:  # under a profiler the check's launch is the one profiled
                        entry.update(self.timer(f, sets))
                except Exception as err:
                    entry["error"] = f"{type(err).__name__}: {str(err).strip()[:300]}"
                    if not self.dry:
                        self.check_context(where, entry)
                row["kernels"].append(entry)
            if section == "layers" and not light and not self.args.profile:
                row["torch"] = self.time_torch_layer(layer, wt, bt, xs)
            self.result[section].append(row)
            del dev_arrays, out

    def check_context(self, where: str, entry: dict) -> None:
        """After a failed launch: if the CUDA context is broken (e.g. an illegal address), nothing after
        it can be trusted: record it and stop the run (the JSON keeps everything measured so far)."""
        import torch

        try:
            torch.cuda.synchronize()
            torch.zeros(1, device="cuda").add_(1).item()
        except Exception as err:
            self.result["fatal"] = {"where": where, "kernel": entry.get("func"), "error": str(err)[:300]}
            raise SystemExit(f"CUDA context broken after {entry.get('func')}: {str(err)[:200]}")

    def time_torch_layer(self, layer, wt, bt, xs) -> dict:
        import torch

        res = {}
        for name, dtype, cl, tf32 in (("cudnn_fp32", torch.float32, False, False), ("cudnn_tf32", torch.float32, False, True),
                                      ("cudnn_fp16_channels_last", torch.float16, True, False)):
            if self.dry and dtype == torch.float16:
                continue  # CPU half convs are slow or missing; the path is the same as on the GPU
            self.set_tf32(tf32)
            try:
                w = wt.to(self.tdev, dtype)
                b = bt.to(self.tdev, dtype) if bt is not None else None
                xs_d = [x.to(self.tdev, dtype) for x in xs]
                if cl and layer["op"] == "conv2d":
                    w = w.contiguous(memory_format=torch.channels_last)
                    xs_d = [x.contiguous(memory_format=torch.channels_last) for x in xs_d]
                fn = torch_layer_fn(layer, w, b)
                with torch.no_grad():
                    res[name] = self.timer(fn, [[x] for x in xs_d])
            except Exception as err:
                res[name] = {"error": f"{type(err).__name__}: {str(err).strip()[:200]}"}
            finally:
                self.set_tf32(False)
        return res
