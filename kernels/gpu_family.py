"""Which fixed kernel configuration table a device uses: "sm90" (Hopper), "sm80" (Ampere) or "default".

Every kernel keeps one table per family instead of autotuning, so the same code runs in Triton's
interpreter (on the CPU, always "default") and compiles within each GPU's limits.
"""

from __future__ import annotations

import torch


def gpu_family(device: torch.device) -> str:
    if device.type != "cuda":
        return "default"
    major, _ = torch.cuda.get_device_capability(device)
    return "sm90" if major >= 9 else "sm80" if major >= 8 else "default"
