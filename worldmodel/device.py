"""Where and how fast training runs: the device, whether bf16 matmuls are native there (never default to bf16
on an AVX2-only CPU, where they run ~100x slower than fp32), and the measured matmul peak MFU divides by."""

from __future__ import annotations

import logging
import time

import torch

log = logging.getLogger(__name__)


def cpu_flags() -> set[str]:
    """The CPU feature flags of /proc/cpuinfo (empty where there is none, e.g. macOS)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def bf16_is_fast(device: torch.device | str = "cpu") -> bool:
    """Whether bf16 matmuls run natively on `device`: a CUDA GPU that supports bf16, or a CPU with AVX-512-bf16 or
    AMX-bf16. Elsewhere (an AVX2-only CPU) PyTorch emulates them, ~100x slower than fp32."""
    device = torch.device(device)
    if device.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """`auto` -> bf16 where `bf16_is_fast(device)`, else fp32; an explicit bf16 on a device without it is kept
    (with a warning: it is slow there)."""
    fast = bf16_is_fast(device)
    if precision == "auto":
        return "bf16" if fast else "fp32"
    if precision == "bf16" and not fast:
        log.warning("bf16 on %s without native bf16 matmuls (no AVX-512-bf16/AMX): expect ~100x slower steps than "
                    "fp32; use --precision fp32 or auto", device)
    return precision


def resolve_device(name: str) -> torch.device:
    """`auto` -> cuda when available, else cpu; a bare `cuda` gets the current device's index."""
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def matmul_peak_flops(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                      n: int = 2048, repeats: int = 5) -> float:
    """Best-of-`repeats` FLOP/s of an n x n matmul in `dtype` (the reference MFU divides by)."""
    device = torch.device(device)
    g = torch.Generator().manual_seed(0)  # a private generator: measuring must not move the global RNG
    a = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best
