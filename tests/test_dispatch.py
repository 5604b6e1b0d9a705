import logging
from dataclasses import dataclass

import pytest

from angel_kernels.dispatch import Candidate, KernelFamily, NoKernelError


@dataclass(frozen=True)
class Prob:
    m: int


def _family():
    return KernelFamily(
        "toy",
        [
            Candidate("big", can_implement=lambda p: (True, ""), run=lambda: "big",
                      suits=lambda p: (p.m >= 100, "meant for m >= 100")),
            Candidate("even", can_implement=lambda p: (p.m % 2 == 0, "m must be even"), run=lambda: "even"),
            Candidate("small", can_implement=lambda p: (p.m < 10, "m must be < 10"), run=lambda: "small"),
        ],
    )


def test_first_suitable_candidate_wins():
    fam = _family()
    assert fam.select(Prob(200)).name == "big"
    assert fam.select(Prob(4)).name == "even"
    assert fam.select(Prob(3)).name == "small"


def test_no_candidate_lists_every_reason():
    with pytest.raises(NoKernelError) as err:
        _family().select(Prob(11))
    msg = str(err.value)
    assert "meant for m >= 100" in msg and "m must be even" in msg and "m must be < 10" in msg


def test_force_by_argument_and_environment(monkeypatch):
    fam = _family()
    assert fam.select(Prob(4), force="small").name == "small"
    # forcing ignores the regime but never correctness
    assert fam.select(Prob(4), force="big").name == "big"
    monkeypatch.setenv("ANGEL_KERNELS_FORCE_TOY", "small")
    assert fam.select(Prob(4)).name == "small"
    with pytest.raises(NoKernelError, match="forced candidate 'small' cannot serve"):
        fam.select(Prob(12))


def test_force_unknown_name_is_an_error(monkeypatch):
    monkeypatch.setenv("ANGEL_KERNELS_FORCE_TOY", "nope")
    with pytest.raises(NoKernelError, match="unknown candidate 'nope'; known: big, even, small"):
        _family().select(Prob(4))


def test_disable_by_environment(monkeypatch):
    monkeypatch.setenv("ANGEL_KERNELS_DISABLE", "toy.even, other.x")
    fam = _family()
    assert fam.select(Prob(4)).name == "small"
    with pytest.raises(NoKernelError, match="even: disabled by ANGEL_KERNELS_DISABLE"):
        fam.select(Prob(12))


def test_choice_logged_once_per_problem_key(caplog):
    fam = _family()
    with caplog.at_level(logging.INFO, logger="angel_kernels.dispatch"):
        for _ in range(3):
            fam.select(Prob(4))
        fam.select(Prob(6))
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 2 and all("even serves" in m for m in msgs)


def test_duplicate_names_rejected():
    c = Candidate("a", can_implement=lambda p: (True, ""), run=lambda: None)
    with pytest.raises(ValueError, match="duplicate"):
        KernelFamily("dup", [c, c])
