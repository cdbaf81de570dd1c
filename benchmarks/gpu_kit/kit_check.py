"""How a kernel's output is compared with its reference, and how calls are timed."""

from __future__ import annotations

import statistics
import time

from kitlib.reference import rel_error  # noqa: F401 (the project's one measure, for kit_layers and kit_models)

CHECK_RTOL = {"layer": 1e-4, "model": 1e-3}   # rel_error: max|out - ref| / max|ref|, fp32 vs fp32 (TF32 off)


class Timer:
    """Median ms of single calls, each bracketed by CUDA events, the L2 flushed and the inputs rotated
    before each; on a dry run, host timers (the same loop, no GPU)."""

    def __init__(self, dry_run: bool, repeat: int, warmup: int):
        import torch

        self.dry_run, self.repeat, self.warmup = dry_run, repeat, warmup
        self.cuda = not dry_run
        if self.cuda:
            l2 = torch.cuda.get_device_properties(0).L2_cache_size
            self.flush_buf = torch.empty(max(2 * l2, 64 << 20) // 4, dtype=torch.int32, device="cuda")
        else:
            self.flush_buf = torch.empty(1 << 16, dtype=torch.int32)

    def __call__(self, fn, arg_sets: list) -> dict:
        import torch

        for i in range(self.warmup):
            fn(*arg_sets[i % len(arg_sets)])
        times = []
        if self.cuda:
            events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                      for _ in range(self.repeat)]
            for i, (start, end) in enumerate(events):
                self.flush_buf.zero_()
                start.record()
                fn(*arg_sets[i % len(arg_sets)])
                end.record()
            torch.cuda.synchronize()
            times = [s.elapsed_time(e) for s, e in events]
        else:
            for i in range(self.repeat):
                self.flush_buf.zero_()
                t0 = time.perf_counter()
                fn(*arg_sets[i % len(arg_sets)])
                times.append((time.perf_counter() - t0) * 1e3)
        return {"median_ms": statistics.median(times), "min_ms": min(times), "n": len(times)}


def rotation_count(bytes_per_set: int, l2_bytes: int, cap: int = 8) -> int:
    """Input sets to rotate through so that consecutive calls don't find their input in L2."""
    return int(max(2, min(cap, -(-2 * l2_bytes // max(bytes_per_set, 1)))))
