"""A small ReLU MLP (``nn.Sequential`` of Linear / ReLU, as `field._mlp` builds) evaluated as one autograd node.

The field's and the background's MLPs run every training step on a few thousand points; through autograd each
Linear layer's backward takes about nine ATen ops (transposes, an ``addmm`` backward, the weight's transpose
backward, the ReLU's). The hand-written backward here takes five per layer (weight gradient, bias sum, input
gradient, ReLU mask), with the same results, and the forward fuses each hidden layer's bias and ReLU into its
matrix product (with or without gradients). The parameters stay the Sequential's (checkpoints are unchanged).
It supports first derivatives only: code that differentiates through the MLP twice (analytic normals with a
graph) calls the Sequential itself. `forward_layers` and `backward_layers` are the two passes on their own, for
nodes that add work around an MLP (the background's sigmoid and blend, `field._OverLearnedBackground`).
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import nn
from torch.autograd.function import once_differentiable


def transposed_weight(linear: nn.Linear) -> torch.Tensor:
    """``linear.weight.t()``, kept on the module so a step does not make it again for every query: a view, it
    follows the weight's in-place updates (optimizer steps, load_state_dict); it is made again when the weight
    is another tensor (``.to()``, ``.double()``, a new Parameter)."""
    w, wt = linear.weight, linear.__dict__.get("_weight_t")
    if wt is None or wt._base is not w or wt.data_ptr() != w.data_ptr() or wt.dtype != w.dtype or wt.device != w.device:
        with torch.no_grad():  # no autograd history: used only inside the fused nodes' forward or without gradients
            wt = w.t()
        linear.__dict__["_weight_t"] = wt
    return wt


def forward_layers(x: torch.Tensor, weights_t, biases, inputs: Optional[List[torch.Tensor]] = None) -> torch.Tensor:
    """The forward pass on the transposed weights; each layer's input is appended to `inputs` when given. A
    hidden layer with a bias is one op (``_addmm_activation``: addmm and ReLU fused, as cuBLASLt's epilogue)."""
    h, last = x, len(weights_t) - 1
    for i, (wt, b) in enumerate(zip(weights_t, biases)):
        if inputs is not None:
            inputs.append(h)
        if b is None:
            h = torch.mm(h, wt)
            h = h.relu_() if i < last else h
        else:
            h = torch._addmm_activation(b, h, wt) if i < last else torch.addmm(b, h, wt)
    return h


class _MLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weights_t: List[torch.Tensor], *params: Optional[torch.Tensor]) -> torch.Tensor:
        n_layers = len(weights_t)
        weights, biases = params[:n_layers], params[n_layers:]
        inputs: List[torch.Tensor] = []
        h = forward_layers(x, weights_t, biases, inputs)
        ctx.n_layers, ctx.has_bias = n_layers, [b is not None for b in biases]
        ctx.save_for_backward(*inputs, *weights)
        return h

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        n = ctx.n_layers
        grad_x, grad_w, grad_b = backward_layers(grad, ctx.saved_tensors[:n], ctx.saved_tensors[n:], ctx.has_bias,
                                                 ctx.needs_input_grad[0], ctx.needs_input_grad[2:])
        return (grad_x, None, *grad_w, *grad_b)


def backward_layers(grad: torch.Tensor, inputs, weights, has_bias, need_x: bool, need_params):
    """The backward of `forward_layers` from the gradient of its output: (grad_x, [grad_w], [grad_b]). `inputs` are the
    layers' inputs as `forward_layers` appended them; need_params flags the weights, then the biases."""
    n = len(weights)
    grad_w: List[Optional[torch.Tensor]] = [None] * n
    grad_b: List[Optional[torch.Tensor]] = [None] * n
    grad_x = None
    for i in reversed(range(n)):
        if need_params[i]:
            grad_w[i] = grad.t().mm(inputs[i])
        if has_bias[i] and need_params[n + i]:
            grad_b[i] = grad.sum(0)
        if i > 0:  # through layer i and the ReLU before it (its output is layer i's input)
            grad = torch.ops.aten.threshold_backward(grad.mm(weights[i]), inputs[i], 0)
        elif need_x:
            grad_x = grad.mm(weights[0])
    return grad_x, grad_w, grad_b


def layer_tensors(mlp: nn.Sequential):
    """(weights_t, weights, biases) of a Sequential of Linear layers with a ReLU between consecutive ones, the
    arguments of `forward_layers` and of the nodes built on it (weights_t cached, `transposed_weight`); None
    for any other Sequential."""
    linears = [m for m in mlp if isinstance(m, nn.Linear)]
    if len(mlp) != 2 * len(linears) - 1:
        return None
    return [transposed_weight(m) for m in linears], [m.weight for m in linears], [m.bias for m in linears]


def mlp_forward(mlp: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """``mlp(x)`` for a Sequential of Linear layers with a ReLU between consecutive ones, as one autograd node."""
    layers = layer_tensors(mlp)
    if layers is None:
        return mlp(x)
    weights_t, weights, biases = layers
    if not torch.is_grad_enabled():
        return forward_layers(x, weights_t, biases)
    return _MLP.apply(x, weights_t, *weights, *biases)
