"""The largest per-chip batch that fits, and the remat policy that allows the largest.

Each attempt is a full compile (minutes for a 7B model on a small host); one that does not fit fails early, at
the compiler's HBM check. Peak memory is close to affine in the batch, with a non-negative intercept (weights,
optimizer state), so after one fit at batch b with peak p the limit lies at or above b * HBM / p: `largest_batch`
jumps there (97% of it) instead of doubling; after two fits it jumps to where the line through them meets the
HBM. The first failure bounds a bisection over the integers between the last fit and it, whose every other
step tries where the line from the last fit to the failure's own figure (what the compiler said it needed)
crosses the HBM instead of the midpoint. Every step lands at least the tolerance above the last fit, so a fit
already close to the HBM is settled by one more compile.

`best_remat` searches the policy with the most recomputation first (it allows the largest batch), then asks
of each policy with less whether that batch still fits: one compile each. The winner is the largest batch,
the least recomputation among equals; a policy that fails at the winner's batch cannot win, and is reported
by that failure alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from owl_jax.aot.train_plan import TrainCompile

# Least recomputation first: nothing; every matmul's output kept; only matmuls without batch dimensions
# (weights, not attention scores) kept; everything recomputed (see owl_jax.modeling._stack).
REMAT_ORDER = ("none", "dots", "dots_with_no_batch_dims", "full")


def largest_batch(
    compile_at: Callable[[int], TrainCompile], *, start: int = 1, limit: int = 4096, within: float = 0.0
) -> tuple[TrainCompile | None, list[TrainCompile]]:
    """The report of the largest batch in [1, limit] that `compile_at(batch)` fits (None if not even 1 does),
    and every attempt in order. `within` > 0 stops the bisection once the smallest failing batch is at most
    that fraction above the largest fit, rounded up to a whole row (0: the exact largest)."""
    attempts: dict[int, TrainCompile] = {}

    def fits(batch: int) -> bool:
        if batch not in attempts:
            attempts[batch] = compile_at(batch)
        return attempts[batch].fits

    low, high, batch = 0, limit + 1, max(1, min(start, limit))  # low fits (0: none yet); high does not
    while batch < high:
        if not fits(batch):
            high = batch
            break
        low = batch
        # at least `within` above the last fit: a line through fits close to the HBM creeps up one row a time
        guess = _extrapolated(attempts, low) or _proportional(attempts[low], low)
        batch = min(limit + 1, max(low + _tolerance(low, within), guess))
    interpolate = True
    while high - low > _tolerance(low, within):
        guess = _interpolated(attempts, low, high) if interpolate else None
        if guess is not None:  # never below the tolerance over the fit: a fit near the HBM ends in one step
            guess = max(guess, low + _tolerance(low, within))
        mid = guess if guess is not None and low < guess < high else (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
        interpolate = not interpolate  # every other step halves the interval, whatever the guesses do
    return (attempts[low] if low else None), list(attempts.values())


def _tolerance(low: int, within: float) -> int:
    """How far above the largest fit a failure may lie for the search to stop."""
    return max(1, math.ceil(within * low))


def _proportional(fit: TrainCompile, batch: int) -> int:
    """A lower bound of the largest batch from one fit: 97% of HBM over the peak per row, intercept ignored."""
    peak = fit.memory["peak_bytes"] if fit.memory else 0
    return int(batch * 0.97 * fit.hbm_bytes / peak) if peak > 0 else 2 * batch


def _interpolated(attempts: dict[int, TrainCompile], low: int, high: int) -> int | None:
    """Between a fit and a failure that said what it needed: where the line through both meets 97% of HBM."""
    if low not in attempts or not attempts[high].needed_bytes:
        return None
    fit, fail = attempts[low], attempts[high]
    p0, p1 = fit.memory["peak_bytes"], fail.needed_bytes
    if p1 <= p0:
        return None
    return int(low + (0.97 * fit.hbm_bytes - p0) * (high - low) / (p1 - p0))


def _extrapolated(attempts: dict[int, TrainCompile], low: int) -> int | None:
    """The largest batch whose peak, on the line through the two largest fits, stays within 97% of HBM."""
    fitted = sorted((b, r) for b, r in attempts.items() if r.fits)
    if len(fitted) < 2:
        return None
    (b0, r0), (b1, r1) = fitted[-2], fitted[-1]
    p0, p1 = r0.memory["peak_bytes"], r1.memory["peak_bytes"]
    slope = (p1 - p0) / (b1 - b0)
    if slope <= 0:
        return None
    return int(b1 + (0.97 * r1.hbm_bytes - p1) / slope)


def best_remat(
    compile_at: Callable[[str, int], TrainCompile],
    *,
    policies: tuple[str, ...] = REMAT_ORDER,
    start: int = 1,
    limit: int = 4096,
    within: float = 0.0,
) -> tuple[TrainCompile | None, dict[str, TrainCompile | None], list[TrainCompile]]:
    """The winning report, each policy's report at its largest batch found (or its failure at the winner's
    batch; None if nothing fits), and every attempt. `compile_at(policy, batch)` compiles one."""
    order = sorted(policies, key=REMAT_ORDER.index, reverse=True)  # most recomputation first
    best: dict[str, TrainCompile | None] = {}
    winner, attempts = None, []
    for policy in order:
        if winner is None:
            found, tried = largest_batch(lambda b, p=policy: compile_at(p, b), start=start, limit=limit, within=within)
            attempts += tried
            best[policy] = winner = found
            continue
        report = compile_at(policy, winner.per_chip_batch)  # less recomputation: does the batch still fit?
        attempts.append(report)
        best[policy] = report
        if report.fits:
            winner = report
    return winner, {p: best.get(p) for p in REMAT_ORDER if p in best}, attempts


def smallest_failure(attempts: list[TrainCompile], report: TrainCompile) -> int | None:
    """The smallest batch above `report`'s that failed under its remat policy, among `attempts`."""
    failed = [
        a.per_chip_batch
        for a in attempts
        if not a.fits and a.remat == report.remat and a.per_chip_batch > report.per_chip_batch
    ]
    return min(failed, default=None)
