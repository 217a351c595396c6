"""Device choice, on the ground floor so every layer may use it (training, encoding, search)."""

from __future__ import annotations

import torch

from hivlp.errors import UsageError


def pick_device(name: str | torch.device = "auto") -> torch.device:
    """`"auto"`: CUDA when available, else CPU; otherwise the named device, which must exist here."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"device {name!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {name!r}: no CUDA device is available here; use --device cpu or auto")
    return device
