"""Rounding-aware training: the encrypted accumulators rounded in torch as Concrete ML will.

Deployed with `rounding_threshold_bits=R`, Concrete ML rounds each conv / linear accumulator
(the integer sum_i w_i * x_i) to its R most significant bits before the table lookup that
follows: with B the bit width of the accumulator's range over the calibration images, it
drops lsbs = B - R low bits, rounding to the nearest multiple of 2**lsbs. A model trained
without it loses accuracy there (measured here on the fast model, fhe="disable" against
torch: about 1 point of top-1 at 6 bits, 2.5 at 5 bits; results/fast_rounding_1000/), and fewer bits make every lookup cheaper. `round_accumulators` puts
the same rounding into the torch model, with a straight-through gradient, so that training
learns weights that survive it.

Forward hooks, attached by train.py only: they are not in the model, its state or its ONNX
export. While training, B is the range of the accumulator in each batch. Concrete takes it
from the calibration images propagated without rounding, so a deeper layer's B may differ
by a bit; given Concrete's B (`lsbs`), the rounding is Concrete's (tests/test_rounding.py).

`noise`: under FHE, and in Concrete's simulation, a table lookup reads its (rounded) input off
by one step with probability p_error, up or down. Training with the same errors (in training
mode only) is meant to teach the model to tolerate them, for a larger p_error and cheaper crypto
parameters; on fast10w at 5 bits and p_error 0.119 it gained nothing measurable (RESULTS.md).
"""

from __future__ import annotations

import torch
from brevitas.quant_tensor import QuantTensor
from concrete.fhe.dtypes import Integer
from torch.utils.hooks import RemovableHandle

from cli import UserError
from models import SplitNet, conv_row


def bit_width(acc: torch.Tensor) -> int:
    """Bits of the integer type that holds every value of `acc`, as Concrete counts them."""
    return Integer.that_can_represent([int(acc.min().round()), int(acc.max().round())]).bit_width


def round_to_bits(acc: torch.Tensor, bits: int, lsbs: int | None = None, noise: float = 0.0) -> torch.Tensor:
    """`acc` (integer-valued) rounded to a multiple of 2**lsbs, half up, as Concrete's exact
    round_bit_pattern does; by default lsbs keeps the `bits` most significant bits of acc's
    own range. With `noise` > 0, each value then moves one step (2**lsbs, or 1 when nothing
    is dropped) up or down with that probability, as a lookup with p_error = noise reads it.
    The gradient passes straight through."""
    if lsbs is None:
        with torch.no_grad():
            lsbs = bit_width(acc) - bits
    step = 2.0 ** max(lsbs, 0)
    rounded = torch.floor(acc / step + 0.5) * step if lsbs > 0 else acc.detach()
    if noise > 0:
        hit = torch.rand_like(acc) < noise
        rounded = rounded + hit * (2 * torch.randint_like(acc, 2) - 1) * step
    return acc + (rounded - acc).detach()


def _hook(bits: int, lsbs: int | None, noise: float):
    def round_output(layer, inputs, out):
        x = inputs[0]
        if not isinstance(x, QuantTensor):
            raise TypeError(f"{type(layer).__name__}: rounding needs a quantized input (a QuantTensor)")
        unit = x.scale * layer.quant_weight().scale  # one step of the integer accumulator
        acc = out / unit
        acc = acc + (acc.round() - acc).detach()  # the exact integer (float32 sums are off by ~1e-6)
        return round_to_bits(acc, bits, lsbs, noise if layer.training else 0.0) * unit

    return round_output


def round_accumulators(model: SplitNet, bits: int, lsbs: list[int] | None = None, noise: float = 0.0) -> list[RemovableHandle]:
    """Round the accumulator of every encrypted conv / linear of `model` to `bits` bits in
    its forward passes (training and evaluation) until the returned handles are removed;
    `lsbs`: the low bits each layer drops (default: from each batch's range); `noise`: the
    rate of off-by-one lookups to train with (training mode only)."""
    if any(conv_row(c)[4] for c in model.cfg.convs):
        raise UserError(f"model {model.cfg.name!r}: rounding-aware training does not model the rounding of an encrypted average pooling")
    layers = [layer for layer, _ in model.weight_layers()]  # each one's output is rounded under FHE
    lsbs = lsbs or [None] * len(layers)
    if len(lsbs) != len(layers):
        raise ValueError(f"{len(lsbs)} lsbs for {len(layers)} accumulators")
    if not 0 <= noise < 1:
        raise ValueError(f"noise must be in [0, 1), got {noise}")
    return [m.register_forward_hook(_hook(bits, n, noise)) for m, n in zip(layers, lsbs)]
