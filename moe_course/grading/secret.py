"""The course secret: hidden checks' inputs that a learner cannot know in advance.

The hidden probes' inputs are seeded. Were the seeds only those written in the package, an
answer cell could compute the reference's outputs on exactly those inputs while no guard is
active, and return them from a table. So, where the instructor holds a secret, every hidden
probe's inputs derive from it: `hidden_inputs` runs `probe.inputs()` under
`inputs.salted(salt)`, where `salt` is an HMAC-SHA256 of `(grade_id, probe name)` keyed by
the secret. Each seed the probe asks for, and each next candidate `tie_free` tries when one
has ties, derives from the salt, so the inputs are deterministic for a secret and tie-free
for any secret. Visible probes never change: learners run them.

Where the secret comes from, first found wins:

1. `MOE_COURSE_SECRET`: the secret itself, in the environment;
2. `MOE_COURSE_SECRET_FILE`: a file holding it (the course's `nbgrader_config.py` sets this
   to `.moe_course_secret` beside itself when that file exists, so nbgrader autograde's
   kernels, which inherit nbgrader's environment, read it at check time);
3. `moe-course grade --secret-file FILE` (it passes the secret to its own process only; the
   sandboxes that run learner code get neither the secret nor its file name).

Without any, hidden checks use the seeds written in the package: what a learner running
the hidden checks locally, and the tests, get. Make a secret with
``python -c "import secrets; print(secrets.token_hex(32))" > .moe_course_secret`` in the
course directory, readable by the instructor only; it is never released.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path
from typing import Any

from .inputs import salted
from .probe import Inputs

ENV = "MOE_COURSE_SECRET"
ENV_FILE = "MOE_COURSE_SECRET_FILE"
FILE_NAME = ".moe_course_secret"  # its conventional name in the course directory


def read_secret_file(path: str | Path) -> bytes:
    """The secret in `path` (surrounding whitespace dropped); ValueError when empty."""
    data = Path(path).read_bytes().strip()
    if not data:
        raise ValueError(f"secret file {str(path)!r} is empty; expected a secret, e.g. 64 hex "
                         "digits")
    return data


def course_secret() -> bytes | None:
    """The course secret from the environment (`MOE_COURSE_SECRET`, else the file named by
    `MOE_COURSE_SECRET_FILE`), or None.

    >>> isinstance(course_secret(), (bytes, type(None)))
    True
    """
    value = os.environ.get(ENV, "").strip()
    if value:
        return value.encode()
    path = os.environ.get(ENV_FILE, "").strip()
    if path:
        return read_secret_file(path)
    return None


def probe_salt(secret: bytes, grade_id: str, probe_name: str) -> bytes:
    """HMAC-SHA256 of `grade_id` and `probe_name` keyed by the secret.

    >>> probe_salt(b"s", "ex", "p") != probe_salt(b"s", "ex", "q")
    True
    """
    return hmac.new(secret, f"{grade_id}\0{probe_name}".encode(), hashlib.sha256).digest()


def hidden_inputs(grade_id: str, probe: Any, secret: bytes | None) -> Inputs:
    """A hidden probe's inputs: derived from `secret`, or the package's defaults if None."""
    if secret is None:
        return probe.inputs()
    with salted(probe_salt(secret, grade_id, probe.name)):
        return probe.inputs()
