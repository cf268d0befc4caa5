"""AdamW that leaves the day-specific input layers of days absent from a step untouched.

Upstream (nejm-brain-to-text) builds a batch's day weights with
`torch.stack([self.day_weights[i] for i in day_idx])`: a day absent from the batch is not in the
graph, its parameters get no gradient (None), and AdamW skips them, with no momentum step, no
weight decay and no step count. Here the day layers are stacked whole and picked with
`index_select`, so one graph serves every day set on XLA; an absent day then gets a zero
gradient, and plain AdamW would go on moving it on momentum and decaying it.

`DayAdamW` restores upstream's update without dynamic shapes. The trainer sets `days_present`,
an (n_days,) bool tensor on the device (days seen anywhere in the step: every micro-batch and
every replica), before `step()`. Parameters of the day group are updated by AdamW's formulas with
a step count of their own, and the new weight, moments and step count are kept only where their
day is present (`torch.where`), so the graph is the same whichever days a step saw. Every other
group goes through torch's AdamW unchanged (fused on CPU and CUDA).

For a present day the update is torch.optim.AdamW's on a parameter that got gradients only on the
steps where its day was present; the bias corrections are computed on the device in float32 (as
torch's capturable AdamW does) instead of in float64 on the host, so the two agree to float32
rounding. An absent day's weights and optimizer state are left bit-unchanged.

Used by rnn_trainer.build_optimizer; tested by `python -m pytest tests/test_day_adamw.py -q`.
"""

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor


class DayAdamW(torch.optim.AdamW):
    """torch.optim.AdamW whose groups holding `day_indices` (one day index per parameter) update
    only the parameters of the days in `days_present`.

    `days_present` applies to the next `step()` only; without it every day counts as present.
    """

    def __init__(self, params: Iterable[Any], *, n_days: int, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        if kwargs.get("amsgrad") or kwargs.get("maximize"):
            raise ValueError("DayAdamW supports neither amsgrad nor maximize")
        self.n_days = n_days
        for group in self._day_groups():
            days = group["day_indices"]
            if len(days) != len(group["params"]) or not all(0 <= d < n_days for d in days):
                raise ValueError(f"day_indices must give one day in [0, {n_days}) per parameter, got {days}")
        self.days_present: Tensor | None = None

    def _day_groups(self) -> list[dict[str, Any]]:
        return [group for group in self.param_groups if group.get("day_indices") is not None]

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        day_groups = self._day_groups()
        # Hidden from torch's AdamW, which skips a parameter whose gradient is None.
        day_grads = [(p, p.grad) for group in day_groups for p in group["params"]]
        for p, _ in day_grads:
            p.grad = None
        try:
            super().step()
        finally:
            for p, grad in day_grads:
                p.grad = grad
        present, self.days_present = self.days_present, None
        for group in day_groups:
            self._step_day_group(group, present)
        return loss

    def _step_day_group(self, group: dict[str, Any], present: Tensor | None) -> None:
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        device = params[0].device
        if present is None:
            present = torch.ones(self.n_days, dtype=torch.bool, device=device)
        beta1, beta2 = group["betas"]
        # lr and the decay factor 1 - lr * wd go in as one transferred tensor, shape (2,): as
        # Python floats torch_xla would bake them into the graph while they are 0 or 1 (the
        # warm-up starts at lr 0) and compile again once they are not.
        hyper = torch.tensor([group["lr"], 1.0 - group["lr"] * group["weight_decay"]], dtype=torch.float32)
        if device.type == "cuda":
            hyper = hyper.pin_memory()  # copied asynchronously: the step does not wait for the GPU
        hyper = hyper.to(device, non_blocking=True)
        lr, decay = hyper[0], hyper[1]
        for p, day in zip(group["params"], group["day_indices"]):
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            grad, step_old = p.grad, state["step"]
            # AdamW's update, as torch's single-tensor path: decay, moments, bias-corrected step.
            step = step_old + 1
            exp_avg = state["exp_avg"].lerp(grad, 1 - beta1)
            exp_avg_sq = state["exp_avg_sq"].mul(beta2).addcmul_(grad, grad, value=1 - beta2)
            step_size = lr / (1 - beta1**step)
            denom = (exp_avg_sq.sqrt() / (1 - beta2**step).sqrt()).add_(group["eps"])
            new_p = (p * decay).sub_(exp_avg / denom * step_size)
            keep = present[day]  # 0-dim bool on the device: no host read, one graph for any day set
            p.copy_(torch.where(keep, new_p, p))
            state["exp_avg"].copy_(torch.where(keep, exp_avg, state["exp_avg"]))
            state["exp_avg_sq"].copy_(torch.where(keep, exp_avg_sq, state["exp_avg_sq"]))
            step_old.copy_(torch.where(keep, step, step_old))

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's load, keeping this optimizer's day_indices (a checkpoint written by plain AdamW
        has none) and the day step counts on the parameters' device, where `step` reads them."""
        day_indices = [group.get("day_indices") for group in self.param_groups]
        super().load_state_dict(state_dict)
        for group, days in zip(self.param_groups, day_indices):
            if days is None:
                continue
            group["day_indices"] = days
            for p in group["params"]:
                state = self.state.get(p)
                if state and "step" in state:
                    state["step"] = state["step"].to(device=p.device, dtype=torch.float32)


def day_index_of(name: str) -> int | None:
    """Day of a day-layer parameter from its name (`...day_weights.3` -> 3), else None."""
    parent, _, last = name.rpartition(".")
    if parent.rpartition(".")[2] in ("day_weights", "day_biases") and last.isdigit():
        return int(last)
    return None


def count_days(day_indices: Tensor, row_mask: Tensor, *, n_days: int) -> Tensor:
    """(n_days,) float32: real rows (row_mask) of each day in one batch.

    A comparison against arange rather than bincount, whose output size depends on the values:
    the shape stays (n_days,) on XLA. day_indices, row_mask: (B,).
    """
    days = torch.arange(n_days, device=day_indices.device)
    rows = (day_indices[:, None] == days[None, :]) & row_mask[:, None]  # (B, 1) == (1, n_days) -> (B, n_days)
    return rows.sum(dim=0).to(torch.float32)
