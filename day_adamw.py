"""AdamW that leaves the day layers of days absent from a step untouched: on XLA in a few foreach
ops per parameter group with every changing scalar on the device, on CPU and CUDA through torch's
fused AdamW kernel.

Upstream (nejm-brain-to-text) builds a batch's day weights with
`torch.stack([self.day_weights[i] for i in day_idx])`: a day absent from the batch is not in the
graph, its parameters get no gradient (None), and AdamW skips them, with no momentum step, no
weight decay and no step count. Here each day layer is one stacked parameter, (n_days, D, D) and
(n_days, 1, D), whose rows are picked with `index_select`, so one graph serves every day set on
XLA; an absent day then gets a zero gradient, and plain AdamW would go on moving it on momentum
and decaying it.

`DayAdamW` restores upstream's update without dynamic shapes. In a group with `per_day=True`
every parameter's first dimension is the day, and its step count holds one entry per day. The
trainer sets `days_present`, an (n_days,) bool tensor on the device (days seen anywhere in the
step: every micro-batch and every replica), and `finite`, a 0-dim bool (the step's loss and
gradients are finite), before `step()`. What a step leaves unchanged (every parameter when not
finite, an absent day's rows) is masked inside AdamW's own scalars: a decay factor of 1, a moment
weight of 0, a step size of 0, a step-count increment of 0, with its gradient zeroed first. Weights,
moments and step counts of those entries stay bit-unchanged, and the graph is the same for any
day set and either flag.

Why not torch.optim.AdamW: it hands the bias corrections, the step size and the decay factor
to the kernels as Python floats, and torch_xla turns a Python scalar that is 0 or 1 into a graph
constant and any other into data. Over a run they do hit 0 or 1 in float32 (lr 0 at the first
step, 1 - lr * wd early in the warm-up, sqrt(1 - beta2^t) from t = 16,628 with beta2 = 0.999),
and each time every bucket's graph compiles again. Here the step counts live on the device, the
bias corrections are computed from them in the graph, and each step's lr and 1 - lr * wd of every
group arrive as one transferred (n_groups, 2) tensor: data whatever their values. The update is
torch's AdamW (single-tensor formulas, same operation order): moments equal to the bit, weights
to float32 rounding (torch computes the bias corrections in float64 on the host). It runs as
`torch._foreach_*` ops over a group, a few dozen traced ops per step instead of several per
parameter and day.

That path is for XLA. On the CPU and on CUDA, where a scalar is never a graph constant and a list
of tensors may change from step to step, the same update runs through torch's fused AdamW kernel
(`torch._fused_adamw_`, what `torch.optim.AdamW(fused=True)` calls), which reads each tensor once
per step instead of once per foreach op: a group's parameters in one call; a `per_day` group one
call per day over that day's rows (views into the stacked tensors, each with its own entry of the
step counts as its step). What a step leaves unchanged is passed as the kernel's `found_inf`
(1.0: the call returns before touching anything), and each step count grows by its update flag
before the call, so weights, moments and step counts of absent days and of non-finite steps stay
bit-unchanged, as on the foreach path; the gradients are not modified. A day layer's gradient may
be sparse (rnn_model.use_sparse_day_gradients: rows of the batch's days only): the fused path reads
its rows, a day without one gets a zero row (what its dense gradient holds); the foreach path
makes it dense first. The update then equals
torch's fused AdamW bit for bit, and torch's single-tensor AdamW (and the foreach path) with the
first moment to the bit and the second moment and weights to float32 rounding (the kernel forms
the second moment in another operation order than addcmul). `_kernels` alone picks the path:
`fused=None` (the default) takes the fused kernel on "cpu" and "cuda" when every parameter and
moment is contiguous and all share one dtype, else the foreach ops; `fused=False` always the
foreach ops (the benchmarks compare the two); `fused=True` the kernel or a ValueError.

torch internals relied on, read against torch 2.9.0 and 2.14.1 (torch/optim/adam.py: `_fused_adam`,
which the fused path follows, and `_single_tensor_adam`, which the foreach path follows op for op;
the two versions differ there only in typing and tensor betas): `torch._fused_adamw_(params, grads,
exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, *, lr, beta1, beta2, weight_decay, eps,
amsgrad, maximize, grad_scale, found_inf)` updates in place, reads each step count after the
caller has added this step, takes the bias corrections in float64 from it, and does nothing
where `found_inf` (a float32 tensor) is 1.0; the step counts are torch's `state["step"]` float32
tensors on the parameter's device; `torch._foreach_*` ops as used below. The kernel walks a
tensor's memory in order, so a gradient laid out otherwise is made contiguous first. Checked by
`tests/test_day_adamw.py` on torch 2.9.0.

torch.optim.AdamW's own per-group options (amsgrad, maximize, capturable, differentiable,
decoupled_weight_decay, foreach, fused) are not implemented per group: a group that asks for a
behaviour other than plain AdamW's, or for a kernel choice, is refused with one line, when given
and when loaded (`_check_torch_options`); a loaded state's kernel choices and default values are
dropped, since they record how the file's writer ran, not what its state means.

Used by rnn_trainer.build_optimizer; tested by `python -m pytest tests/test_day_adamw.py -q`.
"""

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

# torch.optim.AdamW's group options, at the value under which its update is this optimizer's.
_TORCH_ADAMW_BEHAVIOUR = {"amsgrad": False, "maximize": False, "differentiable": False, "decoupled_weight_decay": True}
# torch.optim.AdamW's kernel choices: here one choice for every group, DayAdamW(fused=...).
_TORCH_ADAMW_KERNELS = ("foreach", "fused", "capturable")
# Devices with a fused AdamW kernel this optimizer has been read against.
_FUSED_DEVICES = ("cpu", "cuda")


class DayAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, no amsgrad) whose `per_day` groups update only the days in
    `days_present`, and which leaves everything untouched when `finite` is False.

    `days_present` and `finite` apply to the next `step()` only; unset, every day counts as
    present and the step as finite. All parameters must live on one device. `fused`: None picks
    torch's fused AdamW kernel where it applies (CPU, CUDA), False the foreach ops, True the
    fused kernel or an error (see `_kernels`).
    """

    def __init__(
        self, params: Iterable[Any], *, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8, weight_decay: float = 1e-2, per_day: bool = False, fused: bool | None = None,
    ) -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, per_day=per_day)
        super().__init__(params, defaults)
        day_params = [p for group in self.param_groups if group["per_day"] for p in group["params"]]
        layouts = {(p.shape[0], p.dim()) for p in day_params}
        if len(layouts) > 1 or any(dim < 1 for _, dim in layouts):
            raise ValueError(f"per_day parameters must share their day count (first dim) and rank, got {layouts}")
        self.n_days, self._day_rank = next(iter(layouts), (0, 1))
        self.fused = fused
        self.days_present: Tensor | None = None
        self.finite: Tensor | None = None

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        _check_torch_options(param_group, index=len(self.param_groups), loaded=False)
        super().add_param_group(param_group)

    def _step_shape(self, group: dict[str, Any]) -> tuple[int, ...]:
        """Shape of a parameter's step count: one per day, broadcasting against (n_days, ...)."""
        return (self.n_days,) + (1,) * (self._day_rank - 1) if group["per_day"] else ()

    def _kernels(self, device: torch.device, params: list[Tensor]) -> str:
        """"fused" or "foreach": the one place that picks how this step's update runs.

        torch's fused kernel exists on the CPU and CUDA; it writes a parameter and its moments
        walking memory in order, so they must be contiguous, and one call takes one dtype.
        """
        if self.fused is False:
            return "foreach"
        states = [self.state[p] for p in params]
        tensors = params + [s["exp_avg"] for s in states] + [s["exp_avg_sq"] for s in states]
        why_not = (
            f"torch has no fused AdamW kernel on {device.type} here" if device.type not in _FUSED_DEVICES
            else "a parameter or moment is not contiguous" if not all(t.is_contiguous() for t in tensors)
            else "the parameters have several dtypes" if len({p.dtype for p in params}) > 1
            else None
        )
        if why_not is None:
            return "fused"
        if self.fused:
            raise ValueError(f"DayAdamW(fused=True): {why_not}")
        return "foreach"

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        present, finite = self.days_present, self.finite
        self.days_present = self.finite = None
        groups = [(group, [p for p in group["params"] if p.grad is not None]) for group in self.param_groups]
        groups = [(group, params) for group, params in groups if params]
        if not groups:
            return loss
        device = groups[0][1][0].device
        for group, params in groups:
            self._init_state(group, params)
        if finite is None:
            finite = torch.ones((), dtype=torch.bool, device=device)
        updates = []  # per group: True where this step updates (0-dim, or one entry per day)
        for group, _ in groups:
            keep = finite
            if group["per_day"]:
                days = present if present is not None else torch.ones(self.n_days, dtype=torch.bool, device=device)
                keep = (days & finite).view(self._step_shape(group))  # (n_days,) -> (n_days, 1, ..., 1)
            updates.append(keep)
        if self._kernels(device, [p for _, params in groups for p in params]) == "fused":
            for (group, params), keep in zip(groups, updates):
                self._fused_update_group(group, params, update=keep)
            return loss
        for _, params in groups:  # the foreach ops mask gradients in place: sparse day rows made dense
            for p in params:
                if p.grad.is_sparse:
                    p.grad = p.grad.to_dense()
        # lr and 1 - lr * wd of every group, computed in float64 as torch's AdamW does and sent as
        # one (n_groups, 2) tensor: torch_xla keeps a transferred tensor of rank > 0 as data, so no
        # value (0 at the first step, 1.0 while lr * wd is tiny) becomes a graph constant.
        hyper = torch.tensor([[g["lr"], 1.0 - g["lr"] * g["weight_decay"]] for g, _ in groups], dtype=torch.float32)
        if device.type == "cuda":
            hyper = hyper.pin_memory()  # copied asynchronously: the step does not wait for the GPU
        hyper = hyper.to(device, non_blocking=True)
        for i, ((group, params), keep) in enumerate(zip(groups, updates)):
            self._update_group(group, params, lr=hyper[i, 0], decay=hyper[i, 1], update=keep)
        return loss

    def init_state(self) -> None:
        """Create every parameter's zero moments and step counts now rather than at its first step,
        so they exist before the first traced step (spmd.shard_optimizer_state places them)."""
        for group in self.param_groups:
            self._init_state(group, group["params"])

    def _init_state(self, group: dict[str, Any], params: list[Tensor]) -> None:
        """Zero moments and step counts (one per day in a per_day group) for parameters without state."""
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = torch.zeros(self._step_shape(group), dtype=torch.float32, device=p.device)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def _fused_update_group(self, group: dict[str, Any], params: list[Tensor], *, update: Tensor) -> None:
        """The group's update through torch's fused AdamW kernel, where `update` (as in
        `_update_group`) is True: one call for the group, or one per day over the day's rows."""
        states = [self.state[p] for p in params]
        steps = [state["step"] for state in states]
        torch._foreach_add_(steps, [update.to(torch.float32)] * len(params))
        skip = (~update).to(torch.float32)  # the kernel's found_inf: 1.0 returns before any write
        lists = (
            params,
            # Laid out as the parameter, which the kernel assumes; a sparse day gradient is split below.
            [p.grad if p.grad.is_sparse and group["per_day"] else _dense(p.grad).contiguous() for p in params],
            [state["exp_avg"] for state in states],
            [state["exp_avg_sq"] for state in states],
            steps,
        )
        if group["per_day"]:
            # Day d's rows of every list, views into the stacked tensors: (n_days, ...) -> n_days x (...).
            rows = [[_day_rows(t, self.n_days) for t in tensors] for tensors in lists]
            calls = [tuple([r[d] for r in rows_of_list] for rows_of_list in rows) for d in range(self.n_days)]
            skips = skip.view(self.n_days).unbind(0)
        else:
            calls, skips = [lists], [skip]
        beta1, beta2 = group["betas"]
        for (day_params, grads, exp_avgs, exp_avg_sqs, day_steps), found_inf in zip(calls, skips):
            torch._fused_adamw_(
                day_params, grads, exp_avgs, exp_avg_sqs, [], day_steps,
                lr=group["lr"], beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"], eps=group["eps"],
                amsgrad=False, maximize=False, grad_scale=None, found_inf=found_inf,
            )

    def _update_group(self, group: dict[str, Any], params: list[Tensor], *, lr: Tensor, decay: Tensor,
                      update: Tensor) -> None:
        """AdamW's step over one group in foreach ops where `update` (bool, broadcasting against
        each parameter: 0-dim, or one entry per day) is True; elsewhere weights, moments and step
        counts stay."""
        beta1, beta2 = group["betas"]
        states = [self.state[p] for p in params]
        # Gradients of what stays unchanged are zeroed in place: a NaN would survive any masking by
        # multiplication, and a zero adds no second-moment term.
        drop = ~update
        grads = [p.grad.masked_fill_(drop, 0.0) for p in params]
        steps = [state["step"] for state in states]
        exp_avgs = [state["exp_avg"] for state in states]
        exp_avg_sqs = [state["exp_avg_sq"] for state in states]
        n = len(params)
        # AdamW's scalars where updating, the identity elsewhere: small tensors, one set per group.
        mask = update.to(torch.float32)
        decay = torch.where(update, decay, 1.0)
        moment_weight = mask * (1 - beta1)
        beta2_or_one = torch.where(update, beta2, 1.0)
        minus_lr = -lr * mask

        # Small temporaries out of place: on XLA each in-place op adds one more traced op per tensor.
        torch._foreach_add_(steps, [mask] * n)
        # A day never present yet has step 0; its bias corrections stay finite (its update is 0).
        counts = torch._foreach_clamp_min(steps, 1.0)
        # 1 - beta^t as -expm1(t * log(beta)), the log in float64: 1 - pow(float32(0.999), t) would
        # lose four digits to cancellation at small t (1.3e-5 relative at t = 1), torch's float64 none.
        minus_bias_correction1 = torch._foreach_expm1(torch._foreach_mul(counts, math.log(beta1)))  # beta1^t - 1
        step_size = torch._foreach_div([minus_lr] * n, minus_bias_correction1)  # lr / (1 - beta1^t)
        bias_correction2 = torch._foreach_neg(torch._foreach_expm1(torch._foreach_mul(counts, math.log(beta2))))
        bias_correction2_sqrt = torch._foreach_sqrt(bias_correction2)  # sqrt(1 - beta2^t)

        # torch's _single_tensor_adamw, op for op: decay, moments, bias-corrected step.
        torch._foreach_mul_(params, [decay] * n)
        torch._foreach_lerp_(exp_avgs, grads, [moment_weight] * n)
        torch._foreach_mul_(exp_avg_sqs, [beta2_or_one] * n)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
        # Two parameter-sized temporaries, updated in place: on the CPU each new one costs more
        # (fresh pages) than the arithmetic; on XLA the in-place ops trace a few ops more.
        denom = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denom, bias_correction2_sqrt)
        torch._foreach_add_(denom, group["eps"])
        # addcdiv(exp_avg, denom, value=-step_size) computes (value * exp_avg) / denom: same order.
        step = torch._foreach_mul(exp_avgs, step_size)
        torch._foreach_div_(step, denom)
        torch._foreach_sub_(params, step)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's load, after converting a checkpoint written while the day layers were one
        parameter per day (by this optimizer or by plain AdamW): each day group's per-day moments
        and step counts are stacked day first. Step counts go to the parameters' device. A group
        that asks for a torch AdamW behaviour not implemented here is refused (ValueError)."""
        for index, saved in enumerate(state_dict["param_groups"]):
            _check_torch_options(saved, index=index, loaded=True)
        per_day = [group["per_day"] for group in self.param_groups]
        state_dict = _stack_per_day_state(self, state_dict)
        super().load_state_dict(state_dict)
        for group, is_per_day in zip(self.param_groups, per_day):
            for key in (*_TORCH_ADAMW_BEHAVIOUR, *_TORCH_ADAMW_KERNELS, "day_indices"):
                group.pop(key, None)  # "day_indices": this optimizer's key before per_day groups
            group["per_day"] = is_per_day  # the layout is this optimizer's, whatever the file says
            for p in group["params"]:
                state = self.state.get(p)
                if state and "step" in state:
                    step = state["step"].to(device=p.device, dtype=torch.float32)
                    state["step"] = step.reshape(self._step_shape(group)) if is_per_day else step


def _dense(grad: Tensor) -> Tensor:
    return grad.to_dense() if grad.is_sparse else grad


def _day_rows(tensor: Tensor, n_days: int) -> list[Tensor]:
    """A per_day tensor's n_days rows, views into it; for a sparse gradient (rnn_model._DayRows),
    its rows where it holds one and a zero row for the days it does not hold, the dense gradient's
    rows."""
    if not tensor.is_sparse:
        return list(tensor.unbind(0))  # (n_days, ...) -> n_days x (...)
    tensor = tensor.coalesce()  # micro-batches' gradients add up uncoalesced
    rows = [torch.zeros(tensor.shape[1:], dtype=tensor.dtype, device=tensor.device)] * n_days
    for day, row in zip(tensor.indices()[0].tolist(), tensor.values().unbind(0)):
        rows[day] = row
    return rows


def _check_torch_options(group: dict[str, Any], *, index: int, loaded: bool) -> None:
    """ValueError, one line, for a group that sets a torch.optim.AdamW option this optimizer does not
    implement: a behaviour other than plain AdamW's (given or loaded), or a kernel choice (given;
    a loaded one only records how the file's writer ran)."""
    where = f"DayAdamW: parameter group {index}" + (" of the loaded optimizer state" if loaded else "")
    for key, value in _TORCH_ADAMW_BEHAVIOUR.items():
        if key in group and group[key] != value:
            raise ValueError(f"{where} sets {key}={group[key]!r}; DayAdamW implements AdamW with {key}={value} only")
    given = [key for key in _TORCH_ADAMW_KERNELS if key in group]
    if given and not loaded:
        raise ValueError(f"{where} sets {given[0]}={group[given[0]]!r}; DayAdamW picks one kernel for every "
                         "group: DayAdamW(..., fused=None|False|True)")


def _stack_per_day_state(optimizer: DayAdamW, state_dict: dict[str, Any]) -> dict[str, Any]:
    """A copy of `state_dict` with each per_day group's entries stacked, when the file holds one
    parameter per day (n_days x the group's parameters, days innermost, as named_parameters listed
    them); otherwise `state_dict` itself. ValueError when a group fits neither layout."""
    saved_groups = state_dict["param_groups"]
    if len(saved_groups) != len(optimizer.param_groups):
        return state_dict  # torch's load names the mismatch
    n_days = optimizer.n_days
    groups, state = [], dict(state_dict["state"])
    converted = False
    for group, saved in zip(optimizer.param_groups, saved_groups):
        n_params, n_saved = len(group["params"]), len(saved["params"])
        if not group["per_day"] or n_saved == n_params:
            groups.append(saved)
            continue
        days = saved.get("day_indices")
        if n_saved != n_days * n_params or (days is not None and list(days) != list(range(n_days)) * n_params):
            raise ValueError(
                f"optimizer state: a day-layer group holds {n_saved} parameters, neither this model's "
                f"{n_params} stacked day layers nor {n_days} days x {n_params}; the checkpoint does not fit"
            )
        ids = []
        for i, p in enumerate(group["params"]):
            per_day_ids = saved["params"][i * n_days : (i + 1) * n_days]
            per_day = [state.pop(pid, {}) for pid in per_day_ids]
            if any(per_day):
                state[per_day_ids[0]] = _stacked_adam_state(per_day, p)
            ids.append(per_day_ids[0])
        groups.append({**saved, "params": ids})
        converted = True
    if not converted:
        return state_dict
    return {**state_dict, "state": state, "param_groups": groups}


def _stacked_adam_state(per_day: list[dict[str, Any]], param: Tensor) -> dict[str, Tensor]:
    """One stacked parameter's AdamW state from its days' states; a day without state gets zeros."""
    day_shape = param.shape[1:]
    zeros = torch.zeros(day_shape, dtype=param.dtype)

    def stack(key: str) -> Tensor:
        values = [s.get(key, zeros) for s in per_day]
        bad = [v for v in values if v.shape != day_shape]
        if bad:
            raise ValueError(f"optimizer state: a day's {key} has shape {tuple(bad[0].shape)}, this model's "
                             f"day layer {tuple(day_shape)}; the checkpoint does not fit")
        return torch.stack([v.to(device="cpu", dtype=param.dtype) for v in values])  # n x (...) -> (n, ...)

    steps = torch.tensor([float(s["step"]) if "step" in s else 0.0 for s in per_day], dtype=torch.float32)
    return {"step": steps, "exp_avg": stack("exp_avg"), "exp_avg_sq": stack("exp_avg_sq")}


def count_days(day_indices: Tensor, row_mask: Tensor, *, n_days: int) -> Tensor:
    """(n_days,) float32: real rows (row_mask) of each day in one batch.

    A comparison against arange rather than bincount, whose output size depends on the values:
    the shape stays (n_days,) on XLA. day_indices, row_mask: (B,).
    """
    days = torch.arange(n_days, device=day_indices.device)
    rows = (day_indices[:, None] == days[None, :]) & row_mask[:, None]  # (B, 1) == (1, n_days) -> (B, n_days)
    return rows.sum(dim=0).to(torch.float32)
