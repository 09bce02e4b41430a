"""Suite-wide settings: one torch thread (the CI box has 2 cores; tiny models run faster without contention)."""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # inherited by the CLI subprocesses some tests start

from pathlib import Path  # noqa: E402

import torch  # noqa: E402

torch.set_num_threads(1)

# The project's real data lives beside the checkout (../shared/data), in CI as on a developer's machine.
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
