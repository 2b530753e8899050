import os

import pytest
import torch

# Tests are written for the CI box: 2 cores, no GPU. Keep runs deterministic.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_terminal_summary(terminalreporter):
    """Say loudly which photo-set tests did not run, and why (never a silent skip)."""
    from _photos import PHOTO_SKIP_REASON

    skipped = [r for r in terminalreporter.stats.get("skipped", []) if PHOTO_SKIP_REASON in str(r.longrepr)]
    if skipped:
        terminalreporter.write_sep("!", f"{len(skipped)} photo-set test(s) did NOT run", red=True, bold=True)
        for r in skipped:
            terminalreporter.write_line(f"  not run: {r.nodeid}")
        terminalreporter.write_line(f"  why: {PHOTO_SKIP_REASON}", red=True)
