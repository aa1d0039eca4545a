"""SGD_AMom for PyTorch: SGD with Adam-style momentum (the paper's Appendix B.4).

::

    opt = layrot.Layca(layrot.SGD_AMom(model.parameters(), lr=0.1, momentum=0.9))

The rule (see :mod:`layrot.core.amom`, which also says what the paper leaves
open and what is chosen here)::

    g_t = grad_t + weight_decay * w_{t-1}
    v_t = m * v_{t-1} + (1 - m) * g_t          v_0 = 0
    w_t = w_{t-1} - lr * v_t                   (lr / (1 - m^t) with bias_correction=True)

This is the base optimizer for AdaptCopy of an Adam run: Layca keeps only the
direction of the base step, and an Adam run's direction follows the same
average. ``torch.optim.SGD(momentum=m, dampening=m)`` differs: its buffer starts
at ``g_1`` instead of ``(1 - m) g_1``.

Laid out as torch/optim/sgd.py: the math in plain functions (:func:`sgd_amom`
dispatching to a per-tensor loop or foreach kernels), a thin Optimizer around
them, state created on the first step (``momentum_buffer``, ``step``), so
``state_dict`` / ``load_state_dict`` resume the same trajectory.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, cast

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer, ParamsT, _default_to_fused_or_foreach

from layrot.core.amom import average_gains, step_size, validate

__all__ = ["SGD_AMom", "sgd_amom"]

logger = logging.getLogger(__name__)


class SGD_AMom(Optimizer):  # noqa: N801  (the paper's name)
    """SGD with Adam-style momentum: ``v = m v + (1 - m) g``, ``w -= lr v`` (Appendix B.4).

    Args:
        params: parameters or parameter groups, as for any torch optimizer.
        lr: the learning rate rho (under Layca only the direction matters).
        momentum: m in [0, 1), Adam's beta1 (0.9 by default, as Adam's).
        weight_decay: L2 coefficient added to the gradient before the average
            (coupled, like torch's SGD and the paper's "Adam + L2" runs).
        bias_correction: divide ``v_t`` by ``1 - m^t`` (Adam's ``m_hat``). Off by
            default: the paper's formula has no correction. Under Layca both give
            the same weights (a per-tensor factor cancels in the rescaling).
        maximize: ascend instead of descend.
        foreach: foreach kernels (default: on when every parameter is on a device
            that has them, as torch's optimizers decide).

    Raises:
        ValueError: for lr < 0, momentum outside [0, 1) or weight_decay < 0.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        *,
        bias_correction: bool = False,
        maximize: bool = False,
        foreach: bool | None = None,
    ) -> None:
        validate(float(lr), float(momentum), float(weight_decay))
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "bias_correction": bias_correction,
            "maximize": maximize,
            "foreach": foreach,
        }
        super().__init__(params, defaults)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("bias_correction", False)
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)

    def _init_group(
        self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], bufs: list[Tensor], steps: list[Tensor]
    ) -> None:
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("SGD_AMom does not support sparse gradients")
            state = self.state[p]
            if len(state) == 0:
                # Lazy state: v_0 = 0 (the paper's recursion, Adam's m_0), step 0. The step count
                # lives on the CPU in float64 (exact far beyond any run), as load_state_dict keeps it.
                state["step"] = torch.tensor(0.0, dtype=torch.float64)
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            params.append(p)
            grads.append(p.grad)
            bufs.append(state["momentum_buffer"])
            steps.append(state["step"])

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Perform one optimization step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params: list[Tensor] = []
            grads: list[Tensor] = []
            bufs: list[Tensor] = []
            steps: list[Tensor] = []
            self._init_group(group, params, grads, bufs, steps)
            if not params:
                continue
            sgd_amom(
                params,
                grads,
                bufs,
                steps,
                lr=group["lr"],
                momentum=group["momentum"],
                weight_decay=group["weight_decay"],
                bias_correction=group["bias_correction"],
                maximize=group["maximize"],
                foreach=group["foreach"],
            )
        return loss


def sgd_amom(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor],
    state_steps: list[Tensor],
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
    bias_correction: bool = False,
    maximize: bool = False,
    foreach: bool | None = None,
) -> None:
    """Functional SGD_AMom: update ``params``, their buffers and step counts in place.

    ``momentum_buffers`` hold ``v_{t-1}`` (zeros before the first step),
    ``state_steps`` the steps taken (0-d tensors, incremented here).
    """
    if foreach is None:
        _, foreach = _default_to_fused_or_foreach(params, differentiable=False, use_fused=False)
    fn = _multi_tensor_sgd_amom if foreach else _single_tensor_sgd_amom
    fn(
        params,
        grads,
        momentum_buffers,
        state_steps,
        lr=float(lr),
        momentum=float(momentum),
        weight_decay=float(weight_decay),
        bias_correction=bias_correction,
        maximize=maximize,
    )


def _single_tensor_sgd_amom(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor],
    state_steps: list[Tensor],
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
    bias_correction: bool,
    maximize: bool,
) -> None:
    keep, gain = average_gains(momentum)
    for param, grad, buf, step_t in zip(params, grads, momentum_buffers, state_steps):
        g = grad if not maximize else -grad
        if weight_decay != 0:
            g = g.add(param, alpha=weight_decay)
        step_t += 1
        buf.mul_(keep).add_(g, alpha=gain)
        param.add_(buf, alpha=-step_size(lr, momentum, int(step_t.item()), bias_correction))


def _multi_tensor_sgd_amom(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor],
    state_steps: list[Tensor],
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
    bias_correction: bool,
    maximize: bool,
) -> None:
    keep, gain = average_gains(momentum)
    grouped = Optimizer._group_tensors_by_device_and_dtype(
        [params, grads, momentum_buffers, state_steps]  # type: ignore[list-item]
    )
    for (dev_params, dev_grads, dev_bufs, dev_steps), _ in grouped.values():
        p_list = cast(list[Tensor], dev_params)
        g_list = cast(list[Tensor], dev_grads)
        b_list = cast(list[Tensor], dev_bufs)
        s_list = cast(list[Tensor], dev_steps)
        torch._foreach_add_(s_list, 1.0)
        if maximize:
            g_list = list(torch._foreach_neg(g_list))
        if weight_decay != 0:
            # A new list (or the negated copy, in place): the caller's .grad stays untouched.
            if maximize:
                torch._foreach_add_(g_list, p_list, alpha=weight_decay)
            else:
                g_list = list(torch._foreach_add(g_list, p_list, alpha=weight_decay))
        torch._foreach_mul_(b_list, keep)
        torch._foreach_add_(b_list, g_list, alpha=gain)
        if bias_correction:
            # Parameters may have taken different numbers of steps (a grad missing on some steps).
            sizes = [-step_size(lr, momentum, int(s.item()), True) for s in s_list]
            torch._foreach_add_(p_list, torch._foreach_mul(b_list, sizes))
        else:
            torch._foreach_add_(p_list, b_list, alpha=-lr)
