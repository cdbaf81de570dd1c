"""The whole-model groups (sparse and TVM-dense): the Relax VM module's parameters rebuilt from the
regenerated weights and checked against the build's fingerprints, the output against PyTorch, then timed
next to cuDNN (a mixin of run.Run)."""

from __future__ import annotations

import os

import numpy as np

from kit_check import CHECK_RTOL, rel_error
from kit_weights import fingerprint_ok, model_param_candidates


class ModelRuns:
    def run_model(self, g: dict):
        import torch

        model, sparsity, batch = g["model"], g["sparsity"], g["batch"]
        net, folded = self.weights(model, sparsity)
        mm = self.manifest["models"][model]
        row = {"model": model, "variant": g["variant"], "sparsity": sparsity, "batch": batch, "params": len(g["params"])}
        cands = model_param_candidates(mm, net, batch, {(p["layer"], p["role"]) for p in g["params"] if "layer" in p})
        npz = np.load(os.path.join(self.kit, g["npz"])) if g.get("npz") else {}
        params, bad = [], []
        for p in g["params"]:
            a = npz[p["npz"]] if "npz" in p else cands.get((p["layer"], p["role"]))
            if a is None or not fingerprint_ok(a, p["fp"]):
                bad.append(p)
                a = None
            params.append(a)
        row["params_match_build"] = not bad
        if any(a is None for a in params):
            self.error(g["name"], f"{len(bad)} regenerated parameters do not fit the module (first: {bad[0]})")
            self.result["models"].append(row)
            return
        in_shape = [batch] + list(mm["input_shape"][1:])
        gen = torch.Generator().manual_seed(7)
        x = torch.randn(*in_shape, generator=gen)
        with torch.no_grad():
            ref = net.to(self.tdev)(x.to(self.tdev)).float().cpu().numpy()
        if self.dry:
            mod = self.module(g["file"]) if self.result["runtime"].get("driver") else None
            row["loaded"] = mod is not None
            if mod is not None:  # the VM on the host device: its inputs bind, nothing launches
                from tvm.runtime.vm import VirtualMachine

                try:
                    vm = VirtualMachine(mod, self.tvm.cpu(0))
                    vm.set_input("main", self.to_tvm(x), *[self.to_tvm(torch.from_numpy(np.ascontiguousarray(a)))
                                                         for a in params])
                    row["vm_inputs_bound"] = True
                except Exception as err:
                    row["vm_inputs_bound"] = f"{type(err).__name__}: {str(err).strip()[:200]}"
            with torch.no_grad():
                row["torch_cpu_ms"] = self.timer(lambda: net(x), [[]])
        else:
            from tvm.runtime.vm import VirtualMachine

            vm = VirtualMachine(self.module(g["file"]), self.dev)
            dparams = [self.to_tvm(torch.from_numpy(np.ascontiguousarray(a)).cuda()) for a in params]
            xd = self.to_tvm(x.cuda())
            vm.set_input("main", xd, *dparams)
            vm.invoke_stateful("main")
            out = vm.get_outputs("main")
            out = out if hasattr(out, "numpy") else out[0]
            row["rel_err"] = rel_error(out.numpy(), ref)
            if row["rel_err"] > CHECK_RTOL["model"]:
                row["error"] = "wrong result: not timed"
            else:
                row["unsparse"] = self.timer(lambda: vm.invoke_stateful("main"), [[]])
            del vm, dparams
            if g["variant"] == "tvm_dense" or g.get("time_torch", True):
                row["torch"] = self.time_torch_model(net, x)
        self.result["models"].append(row)
        net.to("cpu")

    def time_torch_model(self, net, x) -> dict:
        import copy

        import torch

        res = {}
        for name, half, tf32 in (("cudnn_fp32", False, False), ("cudnn_tf32", False, True),
                                 ("cudnn_fp16_channels_last", True, False)):
            self.set_tf32(tf32)
            try:
                m = copy.deepcopy(net).cuda()
                xd = x.cuda()
                if half:
                    m = m.half().to(memory_format=torch.channels_last)
                    xd = xd.half().contiguous(memory_format=torch.channels_last)
                with torch.no_grad():
                    res[name] = self.timer(m, [[xd]])
                del m
            except Exception as err:
                res[name] = {"error": f"{type(err).__name__}: {str(err).strip()[:200]}"}
            finally:
                self.set_tf32(False)
        return res
