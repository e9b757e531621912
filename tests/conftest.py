import contextlib
import os

import pytest
import torch

# Counts attribute() calls compared with Captum, reported at the end of the run.
PARITY_COMPARISONS = {"count": 0}

# The device of the `device` fixture: `pytest --device cuda`, or this variable.
DEVICE_VARIABLE = "IGFAST_TEST_DEVICE"


def pytest_addoption(parser):
    parser.addoption(
        "--device", choices=("cpu", "cuda"), default=os.environ.get(DEVICE_VARIABLE, "cpu") or "cpu",
        help=f"device of the tests that take the `device` fixture (default: ${DEVICE_VARIABLE} or cpu); "
             "on a machine without that device they skip",
    )


def pytest_collection_modifyitems(config, items):
    # Tests that take the fixture (not a `device` parameter of their own) run on the
    # chosen device: `-m on_device` selects them, e.g. for the GPU acceptance run.
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if "device" in getattr(item, "fixturenames", ()) and "device" not in params:
            item.add_marker(pytest.mark.on_device)


@contextlib.contextmanager
def _exact_float32_on_cuda():
    # TF32 rounds float32 matmul and convolution operands to 10 mantissa bits, far
    # beyond the 1e-5 the parity suites allow: parity is checked in true float32.
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture
def device(request):
    """The torch.device the test runs on (--device); skips when it is not there."""
    name = request.config.getoption("--device")
    if name == "cpu":
        yield torch.device("cpu")
        return
    if not name.startswith("cuda"):
        raise pytest.UsageError(f"--device / ${DEVICE_VARIABLE} must be cpu or cuda; got {name!r}")
    if not torch.cuda.is_available():
        pytest.skip(f"--device {name}: no CUDA device here (torch.cuda.is_available() is False)")
    with _exact_float32_on_cuda():
        yield torch.device(name)


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
