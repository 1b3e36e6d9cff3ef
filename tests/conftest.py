"""Fixtures and the CI skip policy. Shared helpers live in tests/helpers/ (imported first: it sets
TRITON_INTERPRET where there is no GPU, before anything imports pema_triton)."""

import os

import pytest
import torch

import helpers  # noqa: F401  (before any pema_triton import: it sets TRITON_INTERPRET)


@pytest.fixture
def nan_empty(monkeypatch):
    """Makes torch.empty return NaN-filled (float) or -1-filled (int) tensors, so an output element that a
    kernel never writes shows up in the comparison instead of hiding behind leftover zeros."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        out = real_empty(*args, **kwargs)
        return out.fill_(float("nan") if out.is_floating_point() else -1)

    monkeypatch.setattr(torch, "empty", empty)


# Under PEMA_REQUIRE_ASSETS=1 (CI) a skip is a failure, unless it is for want of a GPU: a missing transformers,
# datasets or notebook kernel must turn CI red, not quietly drop the tests that need it.
REQUIRE_EVERYTHING = os.environ.get("PEMA_REQUIRE_ASSETS") == "1"
_ALLOWED_SKIP = "CUDA device"


def _fail_forbidden_skip(report):
    if REQUIRE_EVERYTHING and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if _ALLOWED_SKIP not in reason:
            report.outcome = "failed"
            report.longrepr = f"skipped, but PEMA_REQUIRE_ASSETS=1 forbids skips other than for a GPU: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail_forbidden_skip(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _fail_forbidden_skip(outcome.get_result())
