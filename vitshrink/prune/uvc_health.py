"""What keeps UVC's search (``vitshrink.prune.uvc_search``) healthy on any teacher, and its health record.

* ``dual_step``: the budget dual ``z`` with a bound and an anti-windup reset. UVC integrates ``z += eta * (R - B)``
  without limit (clamped at 0 below); while the counts and gates lag behind, ``z`` winds up and carries R far past
  the target (issue 23: on a 4-block MNIST ViT R swung 0.998 -> 0.26 while z went from 88 to -106; the bundled
  teacher ended its search at R 0.107 for 0.5). Here ``z`` restarts from 0 when R crosses the target (the sign of
  ``R - B`` disagrees with ``z``'s) and stays within ``[-bound, bound]``.
* ``SearchWatch``: the stop (R of the search's own hard decisions inside the band now and in ``patience`` of the
  last ``1.25 * patience`` steps)
  and the divergence test (the scale-free loss above ``loss_limit``, or R more than ``runaway`` below the
  target), on which the search restores its last healthy snapshot and halves its count, gate and dual steps.
* ``search_health``: what ``uvc_plan.json`` and report.json carry: traces of R, the decisions' R, the loss and z,
  whether the search's own decisions reached the band, and how much the greedy adjustment changed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

__all__ = ["dual_step", "SearchWatch", "search_health"]


def dual_step(z: float, gap: float, *, lr: float, clip: float, bound: float, two_sided: bool = True,
              reset_on_cross: bool = True) -> float:
    """One ascent step on the budget dual: ``clamp(z0 + lr * clip(gap, +-clip), lo, bound)``.

    ``gap = R - B``; ``z0 = 0`` if ``reset_on_cross`` and ``z * gap < 0`` (R crossed the target, so the pressure
    accumulated on the other side is dropped), else ``z``; ``lo = -bound`` if ``two_sided`` else 0.
    """
    clipped = max(-clip, min(clip, gap))
    start = 0.0 if reset_on_cross and z * clipped < 0 else z
    low = -bound if two_sided else 0.0
    return max(low, min(bound, start + lr * clipped))


@dataclass
class SearchWatch:
    """The search's stop and divergence rules (thresholds: recipes/uvc.yaml)."""

    target: float
    tolerance: float
    patience: int  # steps in a row with the decisions' R in the band before the search stops (0: never stops)
    loss_limit: float  # scale-free search loss (1 = a constant guess) above which the search has diverged
    runaway: float  # R this far below the target: the search has run away
    in_band_steps: int = 0  # of the last ``window`` steps
    loss_ema: float | None = None  # the loss, smoothed: one Gumbel sample that skips a vital block is not divergence
    recent: list[bool] = field(default_factory=list)  # in the band or not, the last ``window`` steps

    def reset(self) -> None:
        self.in_band_steps, self.loss_ema, self.recent = 0, None, []

    def healthy(self, record: dict[str, float]) -> bool:
        """A state worth restarting from: loss well under the limit, R not below the band."""
        return (self.loss_ema is not None and self.loss_ema <= self.loss_limit / 2
                and record["resource"] >= self.target - self.tolerance)

    def in_band(self, ratio: float) -> bool:
        return self.target - self.tolerance - 1e-9 <= ratio <= self.target + 1e-9

    def should_stop(self, decided_ratio: float) -> bool:
        """True once the hard decisions are in the band now and were in ``patience`` of the last
        ``window = ceil(1.25 * patience)`` steps (a count flickering across the band's edge does not reset it)."""
        inside = self.in_band(decided_ratio)
        self.recent = (self.recent + [inside])[-math.ceil(1.25 * self.patience):]
        self.in_band_steps = sum(self.recent)
        return self.patience > 0 and inside and self.in_band_steps >= self.patience

    def divergence(self, loss: float, ratio: float) -> str | None:
        """Why the search has diverged at this step, or None (the loss test is on its moving average, 0.8/0.2)."""
        self.loss_ema = loss if self.loss_ema is None else 0.8 * self.loss_ema + 0.2 * loss
        if not math.isfinite(loss) or self.loss_ema > self.loss_limit:
            return f"search loss {self.loss_ema:.3g} above {self.loss_limit:g}"
        if ratio < self.target - self.runaway:
            return f"R {ratio:.3f} ran below target - {self.runaway:g}"
        return None


@dataclass
class Restart:
    """A restart: the step it happened at, why, and the rate factor from then on."""

    step: int
    reason: str
    rate_factor: float
    restored_step: int

    def record(self) -> dict[str, Any]:
        return {"step": self.step, "reason": self.reason, "rate_factor": self.rate_factor,
                "restored_step": self.restored_step}


@dataclass
class SearchHealth:
    restarts: list[Restart] = field(default_factory=list)
    stopped_at: int | None = None  # step of the in-band stop (None: ran every step)


def search_health(history: list[dict[str, float]], *, target: float, tolerance: float, search_resource: float,
                  final_resource: float, greedy_moves: int, health: SearchHealth) -> dict[str, Any]:
    """The health record of one search (JSON-ready): traces, band, greedy change, restarts, stop."""
    low = target - tolerance
    in_band = low - 1e-9 <= search_resource <= target + 1e-9
    losses = [h["loss"] for h in history]
    trace = {key: [round(float(h[key]), 5) for h in history] for key in ("step", "resource", "decided", "loss", "z")
             if history and key in history[0]}
    return {
        "target": target, "band": [low, target], "steps_run": len(history), "stopped_at": health.stopped_at,
        "decisions_in_band": in_band, "search_resource": search_resource, "final_resource": final_resource,
        "greedy_moves": greedy_moves, "greedy_change": abs(final_resource - search_resource),
        "restarts": [r.record() for r in health.restarts],
        "max_loss": max(losses) if losses else None, "final_loss": losses[-1] if losses else None,
        "trace": trace,
    }
