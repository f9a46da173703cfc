import os
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

# Keep numeric libraries from oversubscribing the 2 CI cores when tests start worker processes.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture
def run_cli():
    """Run ``python -m twin ARGS`` in a subprocess; returns the CompletedProcess."""
    import subprocess

    def run(*args: str, cwd: Path | None = None, timeout: float = 300):
        return subprocess.run([sys.executable, "-m", "twin", *args], capture_output=True, text=True,
                              cwd=cwd, timeout=timeout)

    return run
