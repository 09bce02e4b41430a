"""Suite-wide settings: one torch thread (the CI box has 2 cores; tiny models run faster without contention)."""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # inherited by the CLI subprocesses some tests start

import torch  # noqa: E402

torch.set_num_threads(1)
