"""RetryPolicy: which failures are retried, how often and after how long (no Celery)."""

from __future__ import annotations

import pickle
import random

import pytest

from tasks_platform.errors import JobError, PermanentError, PlatformError, TransientError
from tasks_platform.jobs.retry import RetryDecision, RetryPolicy, Verdict

SEEDS = range(200)


def ready(**overrides: object) -> RetryPolicy:
    """A policy with every number set: max 5 retries, delays 2, 4, 8 ... capped at 60 s."""
    options: dict[str, object] = {"max_retries": 5, "backoff_base": 2.0, "backoff_max": 60.0}
    options.update(overrides)
    return RetryPolicy(**options)  # type: ignore[arg-type]


class RateLimited(TransientError):
    """A TransientError subclass, as a job module would declare one (module level: picklable)."""


class UnfixableOSError(PermanentError, OSError):
    """Permanent although it is also an OSError."""


# -- backoff ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("retries", "expected"),
    [(0, 2.0), (1, 4.0), (2, 8.0), (3, 16.0), (4, 32.0), (5, 60.0), (6, 60.0), (20, 60.0)],
)
def test_backoff_grows_exponentially_and_is_capped(retries: int, expected: float) -> None:
    assert ready(jitter=False).backoff(retries) == expected


@pytest.mark.parametrize("retries", range(10))
def test_equal_jitter_stays_in_upper_half_of_the_ceiling(retries: int) -> None:
    policy = ready()
    ceiling = min(60.0, 2.0 * 2**retries)
    delays = [policy.backoff(retries, rng=random.Random(seed)) for seed in SEEDS]
    assert all(ceiling / 2 <= delay <= ceiling for delay in delays)
    assert len(set(delays)) > 1, "jitter must spread the delays"


def test_jitter_is_reproducible_with_a_seeded_rng() -> None:
    policy = ready()
    first = [policy.backoff(3, rng=random.Random(42)) for _ in range(3)]
    assert first == [first[0]] * 3


def test_jittered_delays_still_grow_from_one_retry_to_the_next() -> None:
    policy = ready(backoff_max=10_000.0)
    for seed in SEEDS:
        rng = random.Random(seed)
        delays = [policy.backoff(retries, rng=rng) for retries in range(6)]
        # equal jitter: the window of retry n+1 starts where the window of retry n ends
        assert delays == sorted(delays)


@pytest.mark.parametrize(("retries", "expected"), [(0, 2.0), (2, 8.0), (4, 32.0)])
def test_decide_without_jitter_uses_the_exact_backoff(retries: int, expected: float) -> None:
    decision = ready(jitter=False).decide(TransientError("busy"), retries)
    assert decision == RetryDecision(Verdict.RETRY, expected)
    assert decision.retry


def test_decide_with_jitter_draws_from_the_given_rng() -> None:
    policy = ready()
    decisions = {policy.decide(TransientError(), 2, rng=random.Random(7)).delay for _ in range(3)}
    assert len(decisions) == 1
    (delay,) = decisions
    assert 4.0 <= delay <= 8.0


# -- Retry-After -----------------------------------------------------------------------------
@pytest.mark.parametrize(("retry_after", "expected"), [(0, 0.0), (7, 7.0), (42.5, 42.5)])
def test_retry_after_overrides_the_computed_backoff(retry_after: float, expected: float) -> None:
    decision = ready(jitter=False).decide(TransientError("429", retry_after=retry_after), 0)
    assert decision == RetryDecision(Verdict.RETRY, expected)


def test_retry_after_is_capped_by_backoff_max() -> None:
    decision = ready(jitter=False).decide(TransientError("429", retry_after=10_000), 3)
    assert decision.delay == 60.0


@pytest.mark.parametrize("retry_after", [0.0, 0.5, 5.0, 30.0, 59.0, 10_000.0])
def test_retry_after_jitter_adds_at_most_ten_percent_or_one_second(retry_after: float) -> None:
    policy = ready()
    base = min(retry_after, 60.0)
    allowance = min(1.0, base * 0.1)
    for seed in SEEDS:
        decision = policy.decide(
            TransientError("429", retry_after=retry_after), 1, rng=random.Random(seed)
        )
        assert decision.verdict is Verdict.RETRY
        assert base <= decision.delay <= base + allowance


@pytest.mark.parametrize("retry_after", [None, -1.0])
def test_missing_or_negative_retry_after_falls_back_to_backoff(retry_after: float | None) -> None:
    decision = ready(jitter=False).decide(TransientError(retry_after=retry_after), 3)
    assert decision.delay == 16.0


def test_retry_after_does_not_extend_an_exhausted_budget() -> None:
    decision = ready(max_retries=2).decide(TransientError(retry_after=1), 2)
    assert decision == RetryDecision(Verdict.EXHAUSTED)


# -- which failures are retried ---------------------------------------------------------------
@pytest.mark.parametrize(
    "transient", [(), (OSError,), (JobError,), (PlatformError,), (Exception,)], ids=repr
)
@pytest.mark.parametrize("exc", [PermanentError("no"), UnfixableOSError("disk gone")], ids=repr)
def test_permanent_error_is_never_retried_even_if_listed(
    transient: tuple[type[BaseException], ...], exc: BaseException
) -> None:
    policy = ready(transient=transient)
    assert not policy.is_transient(exc)
    assert policy.decide(exc, 0) == RetryDecision(Verdict.PERMANENT)


@pytest.mark.parametrize(
    "exc",
    [OSError("io"), ConnectionError("reset"), TimeoutError("slow"), KeyError("k")],
    ids=repr,
)
def test_listed_transient_types_and_their_subclasses_are_retried(exc: BaseException) -> None:
    policy = ready(transient=(OSError, LookupError))
    assert policy.is_transient(exc)
    assert policy.decide(exc, 0).verdict is Verdict.RETRY


@pytest.mark.parametrize("exc", [TransientError("x"), RateLimited("y", retry_after=3)], ids=repr)
def test_transient_error_is_retried_without_being_listed(exc: BaseException) -> None:
    assert ready().decide(exc, 0).verdict is Verdict.RETRY


@pytest.mark.parametrize(
    "exc",
    [ValueError("bad"), RuntimeError("boom"), ZeroDivisionError(), JobError("plain")],
    ids=repr,
)
def test_unlisted_exceptions_get_a_permanent_verdict(exc: BaseException) -> None:
    decision = ready(transient=(OSError,)).decide(exc, 0)
    assert decision == RetryDecision(Verdict.PERMANENT, 0.0)
    assert not decision.retry


def test_permanent_verdict_wins_over_exhaustion() -> None:
    assert ready(max_retries=1).decide(ValueError(), 5).verdict is Verdict.PERMANENT


@pytest.mark.parametrize(
    ("retries", "verdict"),
    [(0, Verdict.RETRY), (2, Verdict.RETRY), (3, Verdict.EXHAUSTED), (4, Verdict.EXHAUSTED)],
)
def test_retries_at_or_beyond_max_retries_are_exhausted(retries: int, verdict: Verdict) -> None:
    assert ready(max_retries=3).decide(TransientError(), retries).verdict is verdict


def test_max_retries_zero_never_retries() -> None:
    assert ready(max_retries=0).decide(TransientError(), 0) == RetryDecision(Verdict.EXHAUSTED)


# -- defaults --------------------------------------------------------------------------------
def test_with_defaults_fills_only_unset_fields() -> None:
    policy = RetryPolicy(max_retries=1, jitter=False, transient=(OSError,))
    filled = policy.with_defaults(max_retries=9, backoff_base=3.0, backoff_max=30.0)
    assert filled == RetryPolicy(
        max_retries=1, backoff_base=3.0, backoff_max=30.0, jitter=False, transient=(OSError,)
    )
    assert policy.backoff_base is None, "with_defaults returns a copy"


def test_with_defaults_keeps_a_fully_set_policy() -> None:
    policy = ready(max_retries=0)
    assert policy.with_defaults(max_retries=9, backoff_base=9.0, backoff_max=99.0) == policy


def test_with_defaults_fills_everything_on_a_bare_policy() -> None:
    filled = RetryPolicy().with_defaults(max_retries=5, backoff_base=2.0, backoff_max=600.0)
    assert (filled.max_retries, filled.backoff_base, filled.backoff_max) == (5, 2.0, 600.0)
    assert filled.jitter is True
    assert filled.transient == ()


def test_decide_before_with_defaults_on_a_transient_error_raises() -> None:
    with pytest.raises(ValueError, match=r"with_defaults\(\)"):
        RetryPolicy(max_retries=3).decide(TransientError(), 0)


def test_backoff_before_with_defaults_raises() -> None:
    with pytest.raises(ValueError, match="no backoff numbers"):
        RetryPolicy(max_retries=3, backoff_base=1.0).backoff(0)


def test_decide_before_with_defaults_on_a_permanent_failure_needs_no_numbers() -> None:
    assert RetryPolicy().decide(ValueError(), 0).verdict is Verdict.PERMANENT


def test_decide_on_a_bare_policy_raises_instead_of_giving_up() -> None:
    with pytest.raises(ValueError, match="with_defaults"):
        RetryPolicy().decide(TransientError(), 0)


def test_backoff_stays_capped_for_very_high_retry_counts() -> None:
    policy = ready(max_retries=100_000, jitter=False)
    assert policy.decide(TransientError(), 1024) == RetryDecision(Verdict.RETRY, 60.0)


# -- construction ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"max_retries": -1}, ValueError, "max_retries"),
        ({"backoff_base": 0}, ValueError, "backoff_base"),
        ({"backoff_base": -2.0}, ValueError, "backoff_base"),
        ({"backoff_max": 0.0}, ValueError, "backoff_max"),
        ({"transient": ("OSError",)}, TypeError, "exception types"),
        ({"transient": (OSError("an instance"),)}, TypeError, "exception types"),
        ({"transient": (int,)}, TypeError, "exception types"),
        ({"transient": (PermanentError,)}, TypeError, "PermanentError"),
        ({"transient": (OSError, UnfixableOSError)}, TypeError, "UnfixableOSError"),
    ],
    ids=repr,
)
def test_invalid_construction_is_refused(
    options: dict[str, object], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        RetryPolicy(**options)  # type: ignore[arg-type]


def test_policy_is_immutable() -> None:
    policy = ready()
    with pytest.raises(AttributeError):
        policy.max_retries = 9  # type: ignore[misc]


# -- pickling (exceptions cross pool processes) ----------------------------------------------
@pytest.mark.parametrize("protocol", range(2, pickle.HIGHEST_PROTOCOL + 1))
@pytest.mark.parametrize("retry_after", [None, 0, 2.5, 30])
def test_transient_error_pickle_round_trip_keeps_retry_after(
    retry_after: float | None, protocol: int
) -> None:
    copy = pickle.loads(
        pickle.dumps(TransientError("rate limited", retry_after=retry_after), protocol)
    )
    assert type(copy) is TransientError
    assert str(copy) == "rate limited"
    assert copy.retry_after == retry_after


def test_transient_error_subclass_pickle_round_trip_keeps_type_and_retry_after() -> None:
    copy = pickle.loads(pickle.dumps(RateLimited("429 from provider", retry_after=12)))
    assert type(copy) is RateLimited
    assert str(copy) == "429 from provider"
    assert copy.retry_after == 12
    decision = ready(jitter=False).decide(copy, 0)
    assert decision == RetryDecision(Verdict.RETRY, 12.0)


def test_permanent_error_pickle_round_trip() -> None:
    copy = pickle.loads(pickle.dumps(PermanentError("card declined")))
    assert type(copy) is PermanentError
    assert str(copy) == "card declined"


def test_transient_error_pickle_round_trip_keeps_attributes_and_notes() -> None:
    error = TransientError("upstream 503", retry_after=5)
    error.status = 503  # type: ignore[attr-defined]
    error.add_note("while calling the provider")
    copy = pickle.loads(pickle.dumps(error))
    assert copy.retry_after == 5
    assert getattr(copy, "status", None) == 503
    assert getattr(copy, "__notes__", None) == ["while calling the provider"]
