"""Screening of client updates before they touch the global model, and quarantine of clients that keep
sending bad ones. The same screen runs for updates from real devices and from the in-process grid."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from nefl_edge.core.errors import NeflError
from nefl_edge.core.nested import Tensors
from nefl_edge.core.schemas import DeviceProfile

log = logging.getLogger(__name__)
MAX_SAMPLES = 10_000_000


class UpdateRejected(NeflError, ValueError):
    """An update that must not be aggregated; ``reason`` is a short key counted in the metrics."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def _square_sum(x: np.ndarray) -> float:
    """Sum of squares in one BLAS pass over float32 (precise enough for a bound; inf on overflow)."""
    flat = x.reshape(-1)
    with np.errstate(over="ignore", invalid="ignore"):
        return float(np.dot(flat, flat))


def screen(
    tensors: Tensors,
    shapes: dict[str, tuple[int, ...]],
    reference: Tensors,
    num_samples: int,
    declared_samples: int,
    norm_bound: float,
) -> None:
    """Raise :class:`UpdateRejected` unless ``tensors`` are exactly the submodel's tensors (names, float32,
    shapes), all finite, from at most the samples the client declared at hello, and (``norm_bound`` > 0)
    ``||update - reference|| <= norm_bound * ||reference||`` over the trained (non-statistics) tensors."""
    if not 0 < num_samples <= min(declared_samples, MAX_SAMPLES):
        raise UpdateRejected(
            "bad_samples", f"{num_samples} samples claimed; the client declared {declared_samples} at hello"
        )
    if set(tensors) != set(shapes):
        extra, missing = sorted(set(tensors) - set(shapes)), sorted(set(shapes) - set(tensors))
        raise UpdateRejected("bad_names", f"unexpected {extra[:3]}, missing {missing[:3]}")
    for name, value in tensors.items():
        if value.dtype != np.float32:
            raise UpdateRejected("bad_dtype", f"{name} is {value.dtype}, expected float32")
        if tuple(value.shape) != shapes[name]:
            raise UpdateRejected("bad_shape", f"{name} has shape {tuple(value.shape)}, expected {shapes[name]}")
    # One pass per tensor where the norm bound applies: a finite sum of squared differences to the (finite)
    # reference proves every value finite; only an overflow or a non-finite sum takes the exact look.
    trained = [n for n in shapes if "running_" not in n] if norm_bound > 0 else []
    change = size = 0.0
    for name in trained:
        with np.errstate(over="ignore", invalid="ignore"):
            delta = np.subtract(tensors[name], reference[name], dtype=np.float32)
        squares = _square_sum(delta)
        if not np.isfinite(squares):
            _finite(name, tensors[name])
            squares = float(np.square(delta, dtype=np.float64).sum())
        change += squares
        size += _square_sum(reference[name])
    for name in shapes.keys() - set(trained):
        _finite(name, tensors[name])
    if norm_bound > 0:
        change, size = float(np.sqrt(change)), float(np.sqrt(size))
        if change > norm_bound * max(size, 1e-12):
            raise UpdateRejected(
                "norm_bound", f"update moved the weights by {change:.3g}, more than {norm_bound} x {size:.3g}"
            )


def _finite(name: str, value: np.ndarray) -> None:
    if not np.isfinite(value).all():
        raise UpdateRejected("not_finite", f"{name} holds NaN or Inf")


@dataclass
class Quarantine:
    """Strikes with decay: every rejected update, task that never came back (``dropped``) or update the
    robust aggregation left out adds one strike; every task done well halves the count. A client reaching
    ``strikes`` sits out ``rounds`` rounds (three rejections in a row always do; one bad answer between
    good ones fades away). A client is *proven* once an update of it was taken and kept (:meth:`proven`); an
    update the robust aggregation left out, or a drop, takes that back."""

    strikes: int = 3
    rounds: int = 5
    _streak: dict[str, float] = field(default_factory=dict)
    _until: dict[str, int] = field(default_factory=dict)
    _recent_drop: dict[str, int] = field(default_factory=dict)
    _proven: dict[str, int] = field(default_factory=dict)

    def record(self, node: str, rejected: bool, round_: int, dropped: bool = False, updated: bool = True) -> None:
        """One outcome of ``node``'s task of ``round_``: a strike when ``rejected`` or ``dropped``; otherwise
        ``updated`` (an update was taken, not a decline) makes ``node`` proven."""
        if dropped:
            self._recent_drop[node] = round_
        if not (rejected or dropped):
            self._streak[node] = self._streak.get(node, 0) / 2
            if updated:
                self._proven[node] = round_
            return
        self._proven.pop(node, None)
        self.strike(node, round_, "dropped its task" if dropped else "rejected update")

    def strike(self, node: str, round_: int, why: str, instead_of_good: bool = False) -> None:
        """One strike; ``instead_of_good``: the task was first :meth:`record`-ed as done well (an update the
        robust aggregation then left out), so that halving is undone first."""
        if instead_of_good:
            self._streak[node] = self._streak.get(node, 0) * 2
        self._proven.pop(node, None)
        self._streak[node] = self._streak.get(node, 0) + 1
        if self._streak[node] >= self.strikes - 1e-9:
            self._until[node] = round_ + self.rounds
            self._streak[node] = 0
            log.warning(
                "client %s quarantined until round %d (%s: strike %d)", node, self._until[node], why, self.strikes
            )

    def block(self, node: str, round_: int, why: str) -> None:
        """Quarantine ``node`` at once for ``rounds`` rounds from ``round_`` (e.g. its refused traffic is over
        budget: a flood, not a mistake)."""
        self._until[node] = max(self._until.get(node, 0), round_ + self.rounds)
        log.warning("client %s quarantined until round %d (%s)", node, self._until[node], why)

    def dropped_recently(self, node: str, round_: int, within: int = 3) -> bool:
        """Whether ``node`` left a task unanswered in the last ``within`` rounds before ``round_``."""
        last = self._recent_drop.get(node)
        return last is not None and round_ - last <= within

    def proven(self, node: str) -> bool:
        """Whether the last task ``node`` answered was an update taken and kept (a device new to the run, or
        one whose last update was rejected, left out or never came, is not)."""
        return node in self._proven

    def blocked(self, node: str, round_: int) -> bool:
        return self._until.get(node, 0) >= round_

    def active(self, round_: int) -> list[str]:
        return sorted(n for n, until in self._until.items() if until >= round_)

    def dump(self) -> dict[str, dict[str, float]]:
        return {
            "streak": dict(self._streak),
            "until": dict(self._until),
            "dropped": dict(self._recent_drop),
            "proven": dict(self._proven),
        }

    def restore(self, data: Optional[dict[str, dict[str, float]]]) -> None:
        if data:
            self._streak = {k: float(v) for k, v in data.get("streak", {}).items()}
            self._until = {k: int(v) for k, v in data.get("until", {}).items()}
            self._recent_drop = {k: int(v) for k, v in data.get("dropped", {}).items()}
            self._proven = {k: int(v) for k, v in data.get("proven", {}).items()}


@dataclass
class SpeedEvidence:
    """A device's declared training speed against what it delivers. The speed a device declares at hello
    (``DeviceProfile.samples_per_s`` on its probe submodel) sets its capacity; once a task has taken more
    than ``judged_share`` of the deadline at less than ``1 / slack`` of the declared speed, or was never
    answered (the declared speed is then divided by 4 per unanswered task), the capacity is computed from
    the speed it delivered instead until it delivers its claim again. Only tasks that took a large share of
    the deadline are judged: on short tasks, downloads and session start-up dominate the time to answer."""

    slack: float = 3.0
    judged_share: float = 0.5
    _trusted: dict[str, float] = field(default_factory=dict)

    def observe(
        self,
        node: str,
        profile: Optional[DeviceProfile],
        cost_mflops: float,
        samples_trained: int,
        seconds: float,
        deadline_s: float,
        answered: bool,
    ) -> Optional[str]:
        """Record one task's evidence (``samples_trained``: trained, or planned for an unanswered task);
        returns why the claim is no longer trusted (None: nothing new)."""
        if profile is None or not profile.samples_per_s or not profile.probe_mflops or cost_mflops <= 0:
            return None
        declared = profile.samples_per_s
        if not answered:  # it did not train samples_trained within the deadline: at most that speed, halved
            bound = samples_trained / deadline_s * cost_mflops / profile.probe_mflops / 2
            self._trusted[node] = min(self._trusted.get(node, declared), declared, bound)
            return f"task never answered: trusted speed {self._trusted[node]:.3g} samples/s instead of {declared:.3g}"
        if seconds < self.judged_share * deadline_s or seconds <= 0:
            return None
        delivered = samples_trained / seconds * cost_mflops / profile.probe_mflops
        if delivered * self.slack < declared:
            self._trusted[node] = delivered
            return f"declared {declared:.3g} samples/s, delivered {delivered:.3g}"
        self._trusted.pop(node, None)
        return None

    def profile(self, node: str, profile: Optional[DeviceProfile]) -> Optional[DeviceProfile]:
        """``profile`` with the speed the evidence supports."""
        trusted = self._trusted.get(node)
        if profile is None or trusted is None or profile.samples_per_s is None:
            return profile
        return profile.model_copy(update={"samples_per_s": min(profile.samples_per_s, trusted)})
