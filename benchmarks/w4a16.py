"""W4A16 matmuls: the CPU int4 path against dense fp32 and bf16 (and, later, the Triton kernel on a GPU).

    .venv/bin/python -m benchmarks.w4a16 [--quick]

For each weight shape N x K and batch size M, times `F.linear` with dense fp32 and bf16 weights and
`kernels.w4a16_cpu.CpuInt4Linear` (torch's int4 tinygemm kernel, group size 128, asymmetric RTN
codes) on the same random weights, as the median of several timed rounds. Decode (M = 1) reads
every weight once per token, so 4-bit weights should win there by up to the byte ratio (8x vs fp32).
Prints, last: `headline: cpu_int4_vs_fp32_m1=<fp32 time / int4 time at M = 1, first shape>`.
"""

from __future__ import annotations

import argparse
import os
import platform
from collections.abc import Callable

import torch
import torch.nn.functional as F

from benchmarks.report import table
from benchmarks.timing import calls_for, time_call
from benchmarks.w4a16_decode import print_decode_table
from kernels.w4a16_cpu import CpuInt4Linear
from kernels.w4a16_format import quantize_rtn

QUICK_SHAPES = [(4096, 4096)]
FULL_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
BATCHES = (1, 16, 64)


def median_seconds(fn: Callable[[], object], min_time: float = 0.3, rounds: int = 7) -> float:
    """Median over `rounds` of the mean time of `fn`, each round about `min_time / rounds` long."""
    fn()  # warm-up, so the calibration call below is not the first one
    return time_call(fn, calls_for(fn, min_time / rounds), rounds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one shape (4096 x 4096)")
    ap.add_argument("--group-size", type=int, default=128)
    args = ap.parse_args()
    shapes = QUICK_SHAPES if args.quick else FULL_SHAPES
    print(
        f"# benchmarks/w4a16.py{' --quick' if args.quick else ''}\n"
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f};"
        f" torch {torch.__version__}, {torch.get_num_threads()} threads; no GPU: CPU table only"
    )
    rows: list[list[object]] = []
    headline = float("nan")
    gen = torch.Generator().manual_seed(0)
    for n, k in shapes:
        w = torch.randn(n, k, generator=gen) * 0.02
        w16 = w.to(torch.bfloat16)
        int4 = CpuInt4Linear(quantize_rtn(w, args.group_size))
        mib = {"fp32": w.nbytes, "bf16": w16.nbytes, "int4": int4.nbytes}
        for m in BATCHES:
            x = torch.randn(m, k, generator=gen)
            x16 = x.to(torch.bfloat16)
            t32 = median_seconds(lambda: F.linear(x, w))  # noqa: B023
            t16 = median_seconds(lambda: F.linear(x16, w16))  # noqa: B023
            t4 = median_seconds(lambda: int4(x))  # noqa: B023
            if (n, k) == shapes[0] and m == 1:
                headline = t32 / t4
            rows.append(
                [
                    f"{n} x {k}",
                    m,
                    f"{1e3 * t32:.3f}",
                    f"{1e3 * t16:.3f}",
                    f"{1e3 * t4:.3f}",
                    f"{t32 / t4:.2f}",
                    f"{t16 / t4:.2f}",
                    f"{mib['int4'] / t4 / 1e9:.1f}",
                ]
            )
        print(
            f"weights {n} x {k}: fp32 {mib['fp32'] >> 20} MiB, bf16 {mib['bf16'] >> 20} MiB,"
            f" int4 {mib['int4'] / (1 << 20):.1f} MiB (codes + bf16 scales and offsets)"
        )
    headers = [
        "N x K",
        "M",
        "fp32 ms",
        "bf16 ms",
        "int4 ms",
        "int4 vs fp32",
        "int4 vs bf16",
        "int4 weight GB/s",
    ]
    print(f"\n## CPU, group size {args.group_size} (median of 7 rounds)")
    print(table(headers, rows))
    print_decode_table(args.quick)
    print(f"headline: cpu_int4_vs_fp32_m1={headline:.2f}")


if __name__ == "__main__":
    main()
