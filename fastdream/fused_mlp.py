"""A small ReLU MLP (``nn.Sequential`` of Linear / ReLU, as `field._mlp` builds) evaluated as one autograd node.

The field's and the background's MLPs run every training step on a few thousand points; through autograd each
Linear layer's backward takes about nine ATen ops (transposes, an ``addmm`` backward, the weight's transpose
backward, the ReLU's). The hand-written backward here takes five per layer (weight gradient, bias sum, input
gradient, ReLU mask), with the same results. The parameters stay the Sequential's (checkpoints are unchanged).
It supports first derivatives only: code that differentiates through the MLP twice (analytic normals with a
graph) calls the Sequential itself.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import nn
from torch.autograd.function import once_differentiable


class _MLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, n_layers: int, *params: Optional[torch.Tensor]) -> torch.Tensor:
        weights, biases = params[:n_layers], params[n_layers:]
        inputs: List[torch.Tensor] = []
        h = x
        for i, (w, b) in enumerate(zip(weights, biases)):
            inputs.append(h)
            h = torch.addmm(b, h, w.t()) if b is not None else torch.mm(h, w.t())
            if i < n_layers - 1:
                h = h.relu_()
        ctx.n_layers, ctx.has_bias = n_layers, [b is not None for b in biases]
        ctx.save_for_backward(*inputs, *weights)
        return h

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        n = ctx.n_layers
        inputs, weights = ctx.saved_tensors[:n], ctx.saved_tensors[n:]
        grad_w: List[Optional[torch.Tensor]] = [None] * n
        grad_b: List[Optional[torch.Tensor]] = [None] * n
        grad_x = None
        for i in reversed(range(n)):
            if ctx.needs_input_grad[2 + i]:
                grad_w[i] = grad.t().mm(inputs[i])
            if ctx.has_bias[i] and ctx.needs_input_grad[2 + n + i]:
                grad_b[i] = grad.sum(0)
            if i > 0:  # through layer i and the ReLU before it (its output is layer i's input)
                grad = torch.ops.aten.threshold_backward(grad.mm(weights[i]), inputs[i], 0)
            elif ctx.needs_input_grad[0]:
                grad_x = grad.mm(weights[0])
        return (grad_x, None, *grad_w, *grad_b)


def mlp_forward(mlp: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """``mlp(x)`` for a Sequential of Linear layers with a ReLU between consecutive ones, as one autograd node."""
    linears = [m for m in mlp if isinstance(m, nn.Linear)]
    if not torch.is_grad_enabled() or len(mlp) != 2 * len(linears) - 1:
        return mlp(x)
    return _MLP.apply(x, len(linears), *(m.weight for m in linears), *(m.bias for m in linears))
