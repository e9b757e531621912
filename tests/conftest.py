import pytest
import torch

# Counts attribute() calls compared with Captum, reported at the end of the run.
PARITY_COMPARISONS = {"count": 0}


def pytest_terminal_summary(terminalreporter):
    if PARITY_COMPARISONS["count"]:
        terminalreporter.write_line(
            f"igfast: {PARITY_COMPARISONS['count']} attribute() calls compared with Captum"
        )


@pytest.fixture(autouse=True)
def _single_thread_determinism():
    # Results must not depend on thread scheduling; one thread also keeps CI quiet.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
