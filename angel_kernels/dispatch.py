"""Kernel selection as data.

A kernel family (``w8a16``, ``w4a16``, ...) owns an ordered list of candidates. Each candidate says whether it
can compute a problem correctly, ``can_implement(problem) -> (ok, reason)``, and, separately, whether the
problem lies in the regime it is meant for, ``suits(problem) -> (ok, reason)`` (e.g. "M >= 1024"). Automatic
selection takes the first candidate that can and suits; forcing checks only ``can_implement``, so every
candidate can be exercised on any problem it computes correctly (tests force each one on the same inputs). Environment
variables steer the choice without code changes:

- ``ANGEL_KERNELS_FORCE_<FAMILY>=<candidate>`` (e.g. ``ANGEL_KERNELS_FORCE_W8A16=dequant_matmul``) forces one;
  a forced candidate that cannot serve the problem is an error, never a silent fallback.
- ``ANGEL_KERNELS_DISABLE=<family>.<candidate>,...`` removes candidates.

When nothing fits, the error lists every candidate's reason. The choice is logged once per (family,
candidate, problem key) at INFO level.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Generic, Sequence, TypeVar

logger = logging.getLogger("angel_kernels.dispatch")

P = TypeVar("P")


class NoKernelError(ValueError):
    """No candidate of a family can serve the problem (the message carries every reason)."""


@dataclass(frozen=True)
class Candidate(Generic[P]):
    name: str
    can_implement: Callable[[P], tuple[bool, str]]
    run: Callable[..., Any]
    suits: Callable[[P], tuple[bool, str]] = lambda problem: (True, "")


def _disabled() -> set[str]:
    raw = os.environ.get("ANGEL_KERNELS_DISABLE", "")
    return {item.strip() for item in raw.split(",") if item.strip()}


class KernelFamily(Generic[P]):
    def __init__(self, family: str, candidates: Sequence[Candidate[P]], problem_key: Callable[[P], Any] = repr):
        names = [c.name for c in candidates]
        if len(set(names)) != len(names):
            raise ValueError(f"{family}: duplicate candidate names {names}")
        self.family = family
        self.candidates = tuple(candidates)
        self._problem_key = problem_key
        self._logged: set = set()

    @property
    def force_variable(self) -> str:
        return f"ANGEL_KERNELS_FORCE_{self.family.upper()}"

    def names(self) -> list[str]:
        return [c.name for c in self.candidates]

    def get(self, name: str) -> Candidate[P]:
        for c in self.candidates:
            if c.name == name:
                return c
        raise NoKernelError(f"{self.family}: unknown candidate {name!r}; known: {', '.join(self.names())}")

    def select(self, problem: P, *, force: str | None = None) -> Candidate[P]:
        force = force or os.environ.get(self.force_variable) or None
        disabled = _disabled()
        if force is not None:
            cand = self.get(force)
            ok, reason = cand.can_implement(problem)
            if not ok:
                raise NoKernelError(f"{self.family}: forced candidate {force!r} cannot serve {problem}: {reason}")
            chosen = cand
        else:
            reasons = []
            chosen = None
            for cand in self.candidates:
                if f"{self.family}.{cand.name}" in disabled:
                    reasons.append(f"{cand.name}: disabled by ANGEL_KERNELS_DISABLE")
                    continue
                ok, reason = cand.can_implement(problem)
                if ok:
                    ok, reason = cand.suits(problem)
                if ok:
                    chosen = cand
                    break
                reasons.append(f"{cand.name}: {reason}")
            if chosen is None:
                raise NoKernelError(f"{self.family}: no kernel can serve {problem}:\n  " + "\n  ".join(reasons))
        key = (chosen.name, self._problem_key(problem))
        if key not in self._logged:
            self._logged.add(key)
            logger.info("%s: %s serves %s", self.family, chosen.name, problem)
        return chosen
