import atexit
import os
import shutil
import signal
import sys
import tempfile

import pytest

sys.path.insert(0, os.path.dirname(__file__))

# torch.compile's cache keys a compiled backward by the forward graph, not by the extension's op
# schemas: code compiled against an earlier build of the C++ ops would be reused and call them
# with the old arguments. Each test process compiles into a folder of its own, removed at exit.
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    _inductor_cache = tempfile.mkdtemp(prefix="fedlease-tests-inductor-")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = _inductor_cache
    atexit.register(shutil.rmtree, _inductor_cache, ignore_errors=True)

# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors. The variable must be
# set before triton is first imported, so it is set here, before any test module loads.
try:
    import torch

    _has_cuda = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _has_cuda = False
if not _has_cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Property tests: reproducible in CI (same examples every run), randomised elsewhere.
try:
    from hypothesis import settings

    settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
    if os.environ.get("CI"):
        settings.load_profile("ci")
except ImportError:  # pragma: no cover
    pass


def pytest_collection_modifyitems(config, items):
    """Tests marked ``long`` first: started last, one of them would run on alone at the end."""
    items.sort(key=lambda item: item.get_closest_marker("long") is None)  # stable: order kept


def pytest_addoption(parser):
    parser.addoption(
        "--per-test-timeout",
        type=float,
        default=0.0,
        help="fail a test that runs longer than this many seconds (0: no limit; the check runs "
        "when Python regains control, so a long GPU kernel or compile ends first)",
    )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    limit = item.config.getoption("--per-test-timeout")
    if not limit or not hasattr(signal, "SIGALRM"):
        yield
        return

    def on_alarm(signum, frame):
        raise TimeoutError(f"{item.nodeid} ran past --per-test-timeout={limit:g} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, limit)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
