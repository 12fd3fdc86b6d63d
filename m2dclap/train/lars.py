"""LARS: SGD with heavy-ball momentum and a layer-wise trust ratio (You et al., 2017, arXiv:1708.03888).

Written here because torch has no LARS and timm, which has one, is not a dependency (it pulls torchvision).

For every weight tensor (``ndim > 1``) of a group whose ``lars_adapt`` is on:

    g <- g + wd * w
    g <- g * eta * ||w|| / (||g_raw|| + wd * ||w|| + eps)      (1 when ||w|| or ||g_raw|| is 0)

then, for every parameter, ``buf <- momentum * buf + g`` and ``w <- w - lr * buf``. Biases, norm scales and
other 1-D parameters get neither the trust ratio nor weight decay (a ratio on a near-zero bias would freeze it).

``always_adapt`` follows the LARS of timm, which the official AS2M fine-tuning uses
(``timm.optim.Lars(params, lr, momentum=0.9, weight_decay=0)``): there the ratio is only applied when
``weight_decay != 0``, so the official run is plain momentum SGD at lr 2.0. ``always_adapt=True`` gives the
MAE-style LARS that adapts every weight whatever the decay.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch


class LARS(torch.optim.Optimizer):
    """Layer-wise adaptive rate scaling over heavy-ball momentum SGD.

    Args:
        params: parameters or parameter groups; a group may set ``lars_adapt=False`` (e.g. the no-decay group
            of biases and norms) to take plain momentum-SGD steps.
        lr: learning rate.
        momentum: heavy-ball momentum (no dampening).
        weight_decay: L2 decay added to the gradient of adapted weights.
        trust_coefficient: eta, the fraction of ``||w||`` one step at lr 1 may move a weight.
        eps: added to the denominator of the trust ratio.
        always_adapt: apply the trust ratio even when ``weight_decay`` is 0 (timm applies it only with decay).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 0.001,
        eps: float = 1e-8,
        always_adapt: bool = False,
    ):
        if lr < 0 or momentum < 0 or weight_decay < 0 or trust_coefficient <= 0:
            raise ValueError(
                f"LARS: invalid lr={lr}, momentum={momentum}, weight_decay={weight_decay} or "
                f"trust_coefficient={trust_coefficient}"
            )
        defaults = dict(
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            trust_coefficient=trust_coefficient,
            eps=eps,
            always_adapt=always_adapt,
            lars_adapt=True,
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            wd, eta = group["weight_decay"], group["trust_coefficient"]
            adapt_group = group["lars_adapt"] and (wd != 0 or group["always_adapt"])
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if adapt_group and p.ndim > 1:
                    w_norm, g_norm = p.norm(2.0), g.norm(2.0)
                    ratio = eta * w_norm / (g_norm + wd * w_norm + group["eps"])
                    ratio = torch.where((w_norm > 0) & (g_norm > 0), ratio, torch.ones_like(ratio))
                    g = g.add(p, alpha=wd).mul_(ratio)
                state = self.state[p]
                if group["momentum"] != 0:
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = g.detach().clone()
                    else:
                        state["momentum_buffer"].mul_(group["momentum"]).add_(g)
                    g = state["momentum_buffer"]
                p.add_(g, alpha=-group["lr"])
        return loss
