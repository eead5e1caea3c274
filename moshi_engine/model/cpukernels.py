"""Stand-ins for two of Mimi's modules that torch's CPU kernels run slowly in a batch.

Mimi's SEANet encoder and decoder work at the waveform's rate (1920 samples a frame) for
every batch row, so on a CPU they are most of a batched step, and two of their modules
take slow paths there. `use_cpu_kernels(mimi)` swaps in the same functions computed
another way; the weights, the state dict and the streaming states are untouched.
"""

from __future__ import annotations

import torch


class ExpELU(torch.nn.Module):
    """ELU as max(x, 0) + alpha * (exp(min(x, 0)) - 1): the same function from exp, in place.

    torch's CPU ELU computes expm1, which only its AVX2 and AVX-512 kernels vectorise (its
    portable kernel is about four times slower than this), and Mimi's SEANet applies ELU at the
    waveform's rate to every row. Measured in a 16-row step on an AMD EPYC (interleaved runs):
    34.8 ms against torch's 34.8 ms with AVX-512 kernels, 31.0 against 34.1 with AVX2 ones. Two
    allocations and five passes (six before): an allocation of a megabyte costs as much as a pass.
    exp(x) - 1 differs from expm1(x) by float32 rounding near 0, which an activation followed
    by convolutions does not notice.
    """

    def __init__(self, alpha: float) -> None:
        super().__init__()
        self.alpha = alpha

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        negative = torch.clamp(x, max=0).exp_().sub_(1)
        if self.alpha != 1.0:
            negative.mul_(self.alpha)
        return negative.add_(torch.clamp(x, min=0))


class PointwiseConv1d(torch.nn.Conv1d):
    """A kernel-1 Conv1d as one batched matrix product: weight [C_out, C_in] times each row.

    torch's CPU convolution takes a slow path for kernel-1 convolutions over a batch of long
    sequences: a [16, 4, 1920] input to 8 channels (the tiny Mimi's outermost residual blocks)
    costs 1.7 to 2.1 ms, against 0.09 ms as a matrix product, with AVX-512 and with AVX2
    kernels alike; Moshi's own Mimi (32 to 64 channels) 12.5 ms against 1.9. At a batch of 4
    or less both take the same time. Measured in a 16-row step of the tiny model on an AMD
    EPYC (interleaved, p50): 26.3 ms against 27.7; 38.9 against 40.5 at 32 rows.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3:
            return super().forward(x)
        weight = self.weight[:, :, 0].expand(x.shape[0], -1, -1)
        if self.bias is None:
            return torch.bmm(weight, x)
        return torch.baddbmm(self.bias[:, None], weight, x)


def _is_pointwise(conv: torch.nn.Conv1d) -> bool:
    return (conv.kernel_size == (1,) and conv.stride == (1,) and conv.dilation == (1,) and conv.groups == 1
            and conv.padding in ((0,), "valid"))


def use_cpu_kernels(module: torch.nn.Module) -> int:
    """Swap, inside `module`, every nn.ELU for `ExpELU` and every plain kernel-1 nn.Conv1d for
    `PointwiseConv1d` (for serving on a CPU); returns how many modules were swapped."""
    swapped = 0
    for parent in module.modules():
        for name, child in parent.named_children():
            if type(child) is torch.nn.ELU and not child.inplace:
                setattr(parent, name, ExpELU(child.alpha))
                swapped += 1
            elif type(child) is torch.nn.Conv1d and _is_pointwise(child):
                child.__class__ = PointwiseConv1d  # same parameters and state dict, another forward
                swapped += 1
    return swapped
