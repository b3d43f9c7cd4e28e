"""What a benchmark module describes: cases, implementations, comparisons and result checks.

A *case* is one input setting (shape, dtype, layout, mode). Several *implementations* are timed
on it (the PyTorch baseline, avkernels, other competitors); every one of them is first checked
against the case's *reference* result, then timed by pytest-benchmark. *Comparisons* name the
candidate/baseline pairs whose time ratio (candidate / baseline, medians from the same run) is
reported, optionally with a target the candidate should stay at or under.

A benchmark module declares its cases with a factory and one line of test body::

    @pytest.mark.bench_cases(factory=my_cases)  # my_cases(quick: bool) -> list[Case]
    def test_my_op(compare, case, implementation):
        compare(case, implementation)

``benchmarks/conftest.py`` turns the factory into one test per (case, implementation), runs the
check, warm-up and timing, and at the end of the session prints and saves the ratio table.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

Result = dict[str, Tensor]
"""What one call of an implementation produced, by name (``"y"``, ``"grad_x"``, ...)."""

Step = Callable[[], Result]
"""One call of an implementation on its case's inputs: the unit that is timed."""


@dataclass(frozen=True)
class Implementation:
    """A way of computing a case.

    Args:
        label: name in tables, e.g. ``"nn.BatchNorm2d -> ReLU"``.
        build: returns a fresh :data:`Step` (its own modules and state); called once per test,
            so anything expensive to prepare (a ``torch.compile``) is made here, once per case.
    """

    label: str
    build: Callable[[], Step]


@dataclass(frozen=True)
class Comparison:
    """A reported ratio: time of ``candidate`` / time of ``baseline`` (implementation ids).

    ``target``: the ratio the candidate should reach (at most); ``None`` reports without one.
    Targets are reported as met or missed and never fail the run.
    ``interleave``: time the pair interleaved (see ``conftest.py``) even without a target;
    comparisons with a target always are. Off by default because the baseline's step is built
    a second time (a ``torch.compile`` baseline would compile again).
    """

    candidate: str
    baseline: str
    target: float | None = None
    interleave: bool = False

    @property
    def interleaved(self) -> bool:
        return self.interleave or self.target is not None


def assert_results_close(
    actual: Result, expected: Result, atol: Mapping[str, float] | None = None
) -> None:
    """Every tensor of ``actual`` matches the tensor of the same name in ``expected``.

    Floating tensors: same dtype, device and memory format, values within a tolerance wide
    enough for a different rounding order (relative and absolute 1e-4 for float32, 2e-2 for
    half types) and narrow enough to catch a wrong formula. Integer tensors (counts): equal.
    ``atol[name]`` replaces the absolute tolerance of one result: for long sums, whose rounding
    error grows with their length, and for counts of values that may round across a threshold.
    """
    atol = atol or {}
    unknown = sorted(set(actual) - set(expected))
    assert not unknown, f"the reference does not produce {unknown}: nothing to check them against"
    assert actual, "the implementation returned no result to check"
    for name, value in actual.items():
        reference = expected[name]
        message = f"{name}: {{}}".format
        if value.dim() == 4:
            formats = [
                "channels_last"
                if t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
                else "contiguous"
                for t in (value, reference)
            ]
            assert formats[0] == formats[1], message(
                f"memory format {formats[0]}, the reference has {formats[1]}"
            )
        if value.is_floating_point():
            tolerance = _float_tolerance(reference.dtype)
            torch.testing.assert_close(
                value, reference, rtol=tolerance, atol=atol.get(name, tolerance), msg=message
            )
        else:
            allowed = atol.get(name, 0)
            assert value.dtype == reference.dtype, message(
                f"dtype {value.dtype}, the reference has {reference.dtype}"
            )
            worst = (value.long() - reference.long()).abs().max().item() if value.numel() else 0
            assert worst <= allowed, message(f"counts differ by up to {worst} (allowed {allowed})")


def relative_error(value: Tensor, reference: Tensor) -> float:
    """L2 norm of the difference / L2 norm of the reference (float64)."""
    return ((value.double() - reference).norm() / reference.norm()).item()


def _float_tolerance(dtype: torch.dtype) -> float:
    if dtype == torch.float64:
        return 1e-9
    if dtype == torch.float32:
        return 1e-4
    return 2e-2


@dataclass(frozen=True, eq=False)
class Case:
    """One benchmark setting and everything measured on it.

    Args:
        id: test-id part, unique in its module, e.g. ``"train-32x64x56x56-float32-cl-cpu"``.
        title: row title in tables, e.g. ``"train fwd+bwd (32,64,56,56) float32 channels_last"``.
        device: where the inputs live; CUDA cases are synchronised around every timed round.
        implementations: id -> :class:`Implementation`.
        reference: builds the step whose result every implementation is checked against (an
            independent PyTorch computation producing every name any implementation returns).
        comparisons: the ratios reported for this case.
        check: ``check(actual, expected)`` raises ``AssertionError`` on a mismatch.
        roofline_bytes: the bytes one call must move at the performance model's pass count;
            each implementation is also reported in GB/s at these bytes and as a fraction of
            ``roofline_bytes / the copy bandwidth measured on the case's device``.
        calls_per_round: calls per timed round; on CUDA several calls share one synchronise so
            that launch-bound shapes are not dominated by it (times are reported per call).
        warmup_calls: untimed calls after the check (which already ran one, compiling if needed).
    """

    id: str
    title: str
    device: torch.device
    implementations: Mapping[str, Implementation]
    reference: Callable[[], Step]
    comparisons: tuple[Comparison, ...]
    check: Callable[[Result, Result], None] = assert_results_close
    roofline_bytes: int | None = None
    calls_per_round: int = 1
    warmup_calls: int = 3

    def __post_init__(self) -> None:
        for comparison in self.comparisons:
            for side in (comparison.candidate, comparison.baseline):
                if side not in self.implementations:
                    raise ValueError(
                        f"case {self.id}: comparison names unknown implementation {side!r}"
                    )
