"""Suite-wide settings.

Tiny tensors dominate this suite, and on a small shared machine torch's default thread pool
makes them many times slower through contention; one intra-op thread per test process
(pytest-xdist runs one process per core) is both faster and steadier.
"""

import torch

torch.set_num_threads(1)
