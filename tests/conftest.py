"""Suite-wide settings.

Tiny tensors dominate this suite, and on a small shared machine torch's default thread pool
makes them many times slower through contention; one intra-op thread per test process
(pytest-xdist runs one process per core) is both faster and steadier.
"""

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def autograded_course(tmp_path_factory: pytest.TempPathFactory, worker_id: str):
    """The session's autograded nbgrader course (`tests/nbgrader_course.py`), built once.

    Under pytest-xdist every worker has its own basetemp under one shared parent; the course
    lives in that parent, so a worker that asks second gets the first one's course.
    """
    from nbgrader_course import shared

    base = tmp_path_factory.getbasetemp()
    return shared(base.parent if worker_id != "master" else base)
