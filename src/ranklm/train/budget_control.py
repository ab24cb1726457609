"""The budget controller and the budget schedule shared by the learning allocators (ARS, SoftLMs, RankDyna).

Learned masks or thresholds must reach the parameter budget *themselves*. A fixed penalty
does not do it: the paper's ``log(max(T, B) / B)`` pulls with ``1 / T`` whatever the target
(measured on SmolLM2: keep ~0.92 for targets 0.6 and 0.8 alike), a strong one-sided penalty
overshoots below the target (nothing pulls back), and a purely integral (dual-ascent) weight
oscillates around the target with the optimizer's momentum (measured on a tiny Llama: +-0.1).

``BudgetController`` turns the measured hard count ``P`` (deterministic masks, hard
thresholds) into the weight of a differentiable count ``P_soft / B`` in the loss:

    e_t = P_t / B - 1
    I_t = clip(I_{t-1} + ki * e_t, -limit, limit)   (only near the target, |e_t| <= window,
                                                     or when it unwinds the integral)
    w_t = clip(I_t + kp * e_t, -limit, limit)

The integral only accumulates near the target (anti-windup): integrating the large errors
of the first descent kept the weight positive after the count crossed the target, and the
masks overshot below it (measured on a tiny Llama: 0.683 for a 0.7 target).

The weight grows with the distance to the target (proportional part) and with the time spent
over it (integral part), fades once the target is met, and turns negative (gives rank back)
if the count stays under it, so training settles on the budget (measured: within 0.002 of the
target on a tiny Llama in 100 steps, where the integral weight alone missed by up to 0.08).

``cubic_schedule`` is the budget schedule of AdaLoRA / RankDyna: hold ``start`` through
``t_begin``, fall to ``end`` along ``end + (start - end) (1 - (t - t_begin) / (t_end - t_begin))^3``
and hold ``end`` from ``t_end``. RankDyna's active-triplet budget (warm-up, cubic, hold) and
ARS's controlled target keep (``t_begin = 0``) both follow it.
"""

from __future__ import annotations

import torch


def cubic_schedule(t: float, start: float, end: float, t_begin: float, t_end: float) -> float:
    """The budget at step count ``t``: ``start`` until ``t_begin``, cubic to ``end`` at ``t_end``, then ``end``."""
    if t <= t_begin:
        return start
    if t >= t_end:
        return end
    frac = 1.0 - (t - t_begin) / max(t_end - t_begin, 1)
    return end + (start - end) * frac ** 3


class BudgetController:
    """A PI controller on the relative budget excess; its output weighs the differentiable count in the loss."""

    def __init__(self, kp: float, ki: float, limit: float, initial: float = 0.0, window: float = 0.05) -> None:
        self.kp, self.ki, self.limit, self.window = float(kp), float(ki), float(limit), float(window)
        self.integral = float(initial)
        self.weight = float(initial)

    def update(self, count: float, budget: float) -> float:
        """Feed the hard count after a step; returns the weight for the next step."""
        e = count / budget - 1.0
        if abs(e) <= self.window or e * self.integral < 0:
            self.integral = max(-self.limit, min(self.limit, self.integral + self.ki * e))
        self.weight = max(-self.limit, min(self.limit, self.integral + self.kp * e))
        return self.weight

    def state(self) -> torch.Tensor:
        return torch.tensor([self.weight, self.integral], dtype=torch.float64)

    def load(self, t: torch.Tensor) -> None:
        self.weight, self.integral = float(t[0]), float(t[1])


__all__ = ["BudgetController", "cubic_schedule"]
