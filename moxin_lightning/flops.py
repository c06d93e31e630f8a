"""Peak FLOP/s of one device: the denominator of MFU (model FLOPs utilisation).

On a GPU the peak is the datasheet's dense tensor-core figure for the dtype training multiplies in. Lightning
keeps such a table (`lightning.fabric.utilities.throughput.get_available_flops`) and it is used as is, except for
the chips where it has no entry or quotes the 2:4-sparsity figure, which is twice what dense training can reach
(H200 and H100 NVL): those come from `_DENSE_PEAKS` below. A CPU has no datasheet figure worth trusting (it
depends on cores, clocks and vector units), so its peak is measured: the best FLOP/s of a large square matmul in
the same dtype, on the same machine, in the same process as the training it is compared with.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import torch

# Dense peaks (no sparsity) from NVIDIA's datasheets, per GPU. Matched in order against the lowercase name
# torch reports ("nvidia h200", "nvidia h200 nvl", "nvidia h100 nvl"), so the NVL entries come first.
_DENSE_PEAKS: tuple[tuple[str, dict[torch.dtype | str, float]], ...] = (
    ("h200 nvl", {torch.bfloat16: 835e12, torch.float16: 835e12, "tfloat32": 418e12, torch.float32: 60e12}),
    ("h200", {torch.bfloat16: 989.4e12, torch.float16: 989.4e12, "tfloat32": 494.7e12, torch.float32: 66.9e12}),
    ("h100 nvl", {torch.bfloat16: 835e12, torch.float16: 835e12, "tfloat32": 418e12, torch.float32: 60e12}),
)

# The dtype the matmuls run in, by Lightning precision setting (`Trainer.precision`).
_PRECISION_DTYPES: dict[str, torch.dtype] = {
    "32-true": torch.float32,
    "32": torch.float32,
    "bf16-mixed": torch.bfloat16,
    "bf16-true": torch.bfloat16,
    "bf16": torch.bfloat16,
    "16-mixed": torch.float16,
    "16-true": torch.float16,
    "16": torch.float16,
    "64-true": torch.float64,
    "64": torch.float64,
}


@dataclass(frozen=True)
class PeakFlops:
    """FLOP/s of one device, and where the figure comes from (printed next to MFU so it can be judged)."""

    flops: float
    source: str


def precision_dtype(precision: str) -> torch.dtype:
    """The matmul dtype of a Lightning precision setting such as 'bf16-mixed'."""
    if precision not in _PRECISION_DTYPES:
        raise ValueError(
            f"cannot tell the matmul dtype of precision {precision!r}; pass peak_flops explicitly "
            f"(known precisions: {', '.join(_PRECISION_DTYPES)})"
        )
    return _PRECISION_DTYPES[precision]


def datasheet_peak_flops(device_name: str, dtype: torch.dtype, tf32: bool = False) -> float | None:
    """Dense datasheet FLOP/s of a GPU named like `torch.cuda.get_device_name()`, or None if not in our table.

    `tf32`: float32 matmuls run on tensor cores (torch.get_float32_matmul_precision() != 'highest').
    """
    name = device_name.lower()
    for chip, peaks in _DENSE_PEAKS:
        if chip in name:
            key = "tfloat32" if dtype is torch.float32 and tf32 else dtype
            return peaks.get(key)
    return None


def gpu_peak_flops(device: torch.device, dtype: torch.dtype) -> PeakFlops | None:
    """Datasheet peak of a CUDA device: our dense table first, then Lightning's; None if neither knows it."""
    from lightning.fabric.utilities.throughput import get_available_flops

    name = torch.cuda.get_device_name(device)
    tf32 = torch.get_float32_matmul_precision() != "highest"
    flops = datasheet_peak_flops(name, dtype, tf32)
    if flops is not None:
        return PeakFlops(flops, f"datasheet, dense {dtype} ({name})")
    flops = get_available_flops(device, dtype)
    if flops is not None:
        return PeakFlops(float(flops), f"Lightning's table, {dtype} ({name})")
    return None


def measure_matmul_flops(
    device: torch.device | str, dtype: torch.dtype, size: int | None = None, seconds: float = 0.5
) -> float:
    """Best FLOP/s of `size` x `size` matmuls in `dtype` on `device`, timed for about `seconds`.

    The best (not the mean) timing is kept: the peak is what the machine can do, and other load only ever
    slows it down. Default size: 1024 on CPU (a fraction of a second per matmul on a few cores), 8192 on GPU.
    """
    device = torch.device(device)
    size = size or (8192 if device.type == "cuda" else 1024)
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    out = torch.empty(size, size, device=device, dtype=dtype)

    def timed(repeats: int) -> float:
        _synchronize(device)
        start = time.perf_counter()
        for _ in range(repeats):
            torch.mm(a, b, out=out)
        _synchronize(device)
        return (time.perf_counter() - start) / repeats

    # One untimed call warms up the kernel; timings then group enough calls to last ~20 ms each, so that a
    # GPU's launch and synchronisation latency stays out of the figure.
    repeats = max(1, int(0.02 / max(timed(1), 1e-9)))
    best = float("inf")
    deadline = time.perf_counter() + seconds
    rounds = 0
    while rounds < 3 or time.perf_counter() < deadline:
        best = min(best, timed(repeats))
        rounds += 1
    return 2 * size**3 / best


@functools.lru_cache(maxsize=8)
def _measured_peak(device: torch.device, dtype: torch.dtype, threads: int) -> float:
    return measure_matmul_flops(device, dtype)


def peak_flops(device: torch.device | str, dtype: torch.dtype) -> PeakFlops:
    """The FLOP/s MFU divides by, for one device: datasheet on a known GPU, else a measured matmul peak.

    A measurement is made once per (device, dtype, thread count) and process.
    """
    device = torch.device(device)
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        known = gpu_peak_flops(device, dtype)
        if known is not None:
            return known
    flops = _measured_peak(device, dtype, torch.get_num_threads())
    return PeakFlops(flops, f"measured {dtype} matmul on {device.type} ({torch.get_num_threads()} threads)")


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
