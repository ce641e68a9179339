"""Host-to-device copies that never block the host.

A plain `tensor.to("cuda")` of pageable host memory waits for the device: once per layer of a prefill that is
a synchronisation which leaves the GPU idle while the host prepares the next layer. Staging the few numbers
through pinned memory makes the copy asynchronous (torch's pinned allocator keeps the staging buffer alive
until the copy has run).
"""

from __future__ import annotations

import torch


def to_device(host: torch.Tensor, device) -> torch.Tensor:
    """A copy of the host tensor `host` on `device`, issued without blocking the host (pinned staging on CUDA)."""
    device = torch.device(device)
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device).clone()
