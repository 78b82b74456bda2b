"""Unstructured pruning that bounds the FHE accumulators.

Under FHE a conv / linear output is an integer accumulator sum_i w_i * x_i, and its
bit width sets the cost (and feasibility) of the table lookup that follows. For a neuron
with K non-zero integer weights, |w_i| <= w_max and x_i in [x_lo, x_hi]:

    |accumulator| <= K * w_max * max(|x_lo|, |x_hi|)

so keeping at most K = floor((2**(bits-1) - 1) / (w_max * max|x|)) weights per output
neuron guarantees a signed `bits`-bit accumulator for every input, whatever the weights
learn later. The kept weights are the K largest in magnitude (torch.nn.utils.prune masks,
re-selected at every epoch so that connections can move while training).
"""

from __future__ import annotations

import math

import torch
from torch.nn.utils import prune

from models import SplitNet


def int_weight(layer) -> torch.Tensor:
    """The integer weights the layer uses under FHE (pruning mask applied)."""
    w = layer.weight_orig * layer.weight_mask if hasattr(layer, "weight_mask") else layer.weight
    qt = layer.weight_quant(w.detach())
    return torch.round(qt.value / qt.scale)


def max_int_weight(layer) -> int:
    return 2 ** (int(layer.weight_quant.bit_width()) - 1) - 1  # narrow range: symmetric


def keep_per_neuron(layer, x_range: tuple[int, int], bits: int) -> int:
    x_max = max(abs(x_range[0]), abs(x_range[1]))
    return max(1, (2 ** (bits - 1) - 1) // (max_int_weight(layer) * x_max))


def apply_pruning(model: SplitNet, bits: int) -> None:
    """(Re-)select the kept weights of every encrypted layer so its accumulator fits `bits`."""
    if bits <= 0:
        return
    for layer, x_range in model.weight_layers():
        k = keep_per_neuron(layer, x_range, bits)
        w = layer.weight_orig if hasattr(layer, "weight_mask") else layer.weight
        flat = w.detach().abs().reshape(w.shape[0], -1)  # (out, fan_in)
        if k >= flat.shape[1]:
            mask = torch.ones_like(w)
        else:
            top = flat.topk(k, dim=1).indices
            mask = torch.zeros_like(flat).scatter_(1, top, 1.0).reshape(w.shape)
        if hasattr(layer, "weight_mask"):
            layer.weight_mask.copy_(mask)
        else:
            prune.custom_from_mask(layer, "weight", mask)


def folded_state_dict(model: SplitNet) -> dict:
    """State dict with masks folded into the weights: loads strictly into an unpruned model."""
    sd = {}
    for k, v in model.state_dict().items():
        if k.endswith("weight_mask"):
            continue
        if k.endswith("weight_orig"):
            base = k[: -len("_orig")]
            sd[base] = v * model.state_dict()[base + "_mask"]
        else:
            sd[k] = v
    return sd


def pruned_state(model: SplitNet) -> dict:
    """Training state of a pruned model: unmasked weights and the masks, kept apart."""
    sd = model.state_dict()
    masks = {k[: -len(".weight_mask")]: v for k, v in sd.items() if k.endswith(".weight_mask")}
    weights = {k[: -len("_orig")] if k.endswith("weight_orig") else k: v for k, v in sd.items() if not k.endswith("weight_mask")}
    return {"weights": weights, "masks": masks}


def load_pruned_state(model: SplitNet, state: dict) -> None:
    """Inverse of pruned_state, on a freshly built (unpruned) model. Loading into a model that
    already has pruning hooks would leave Brevitas' weight quantizer tracking a stale tensor."""
    model.load_state_dict(state["weights"], strict=True)
    for name, mask in state["masks"].items():
        prune.custom_from_mask(model.get_submodule(name), "weight", mask)


def accumulator_bits(model: SplitNet) -> dict[str, dict]:
    """Worst-case accumulator of each encrypted layer from its integer weights and input range."""
    names = {m: n for n, m in model.named_modules()}
    report = {}
    for layer, (lo, hi) in model.weight_layers():
        w = int_weight(layer)
        w = w.reshape(w.shape[0], -1)  # (out, fan_in)
        acc_hi = torch.clamp(w * hi, min=0).sum(1) + torch.clamp(w * lo, min=0).sum(1)
        acc_lo = torch.clamp(w * hi, max=0).sum(1) + torch.clamp(w * lo, max=0).sum(1)
        worst = int(max(acc_hi.max().item(), -acc_lo.min().item(), 0))
        report[names[layer]] = {
            "max_abs": worst,
            "bits": signed_bits(worst),
            "nonzero_per_neuron_max": int((w != 0).sum(1).max().item()),
            "fan_in": int(w.shape[1]),
        }
    return report


def signed_bits(max_abs: int) -> int:
    """Bits of a signed integer that holds [-max_abs, max_abs]."""
    return int(math.ceil(math.log2(max_abs + 1))) + 1 if max_abs > 0 else 1
