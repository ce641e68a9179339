"""Host-to-device copies that never block the host.

A plain `tensor.to("cuda")` of pageable host memory waits for the device: once per layer of a prefill that is
a synchronisation which leaves the GPU idle while the host prepares the next layer. Staging the few numbers
through pinned memory makes the copy asynchronous (torch's pinned allocator keeps the staging buffer alive
until the copy has run).
"""

from __future__ import annotations

import weakref

import torch


def to_device(host: torch.Tensor, device) -> torch.Tensor:
    """A copy of the host tensor `host` on `device`, issued without blocking the host (pinned staging on CUDA)."""
    device = torch.device(device)
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device).clone()


# id of a device tensor -> (weak reference, the host tensor it was copied from): planning on the host (how many
# tokens a prefill keeps) reads those values without copying them back from the device.
_HOST_COPIES: dict[int, tuple] = {}
_HOST_COPIES_MAX = 1024


def remember_host_copy(device_tensor: torch.Tensor, host: torch.Tensor) -> None:
    """Record that `device_tensor` holds the values of the host tensor `host` (neither is modified later)."""
    if len(_HOST_COPIES) >= _HOST_COPIES_MAX:
        _HOST_COPIES.clear()
    _HOST_COPIES[id(device_tensor)] = (weakref.ref(device_tensor), host)


def host_copy(tensor: torch.Tensor) -> torch.Tensor:
    """The values of `tensor` on the host: the recorded host copy (no device read), else a copy from the device."""
    hit = _HOST_COPIES.get(id(tensor))
    if hit is not None and hit[0]() is tensor:
        return hit[1]
    return tensor.detach().to("cpu")
