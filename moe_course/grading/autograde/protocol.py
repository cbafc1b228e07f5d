"""The worker protocol: how the learner's process reports to the grader, in one place.

The worker writes frames on a pipe: an 8-byte big-endian length (`FRAME_HEADER`), then a
`torch.save` payload of one message, a dict with this run's `nonce` and a `type`, one of the
kinds below. The grader reads each with `torch.load(weights_only=True)` and believes nothing
in it but the data: outputs are judged in its own process.

In order: `READY` (with the walls that are up), then per step `START`, and for a cell step
one `CELL` (its error, if any), for a check step one `PROBE` per probe and a `DONE`; at the
end `END`. Within a check step, before each probe runs, the worker sends `INPUTS` (the
probe's name) and the grader answers with one frame of the same `FRAME_HEADER` layout on the
worker's inputs pipe (fd `INPUTS_FD`): that probe's inputs, a `torch.save` payload without a
nonce. The job itself holds no probe inputs, so learner code never sees a probe's inputs
before that probe runs, inside its exercise's guard.

`HANG` may come at any time during a step: where the learner's code was when the step
neared its time limit (the cells and functions on the stack), so that a function that hangs
is skipped, not run again, by the later steps and sandboxes.
"""

from __future__ import annotations

import struct

FRAME_HEADER = struct.Struct(">Q")  # length of the payload that follows, in bytes

READY = "ready"  # walls: {name: bool | int}
START = "start"  # step: index into the job's steps
CELL = "cell"  # step, error: str | None
INPUTS = "inputs"  # step, probe: its name; asks for that probe's inputs (once per probe)
PROBE = "probe"  # step, probe: its name, outputs (plain data) or error: str
DONE = "done"  # step, tripped: why the exercise's guard failed it (str) or None
HANG = "hang"  # step, where: [[cell index, function name, first line], ...] innermost last
END = "end"  # every step was run

CELL_STEP, PROBE_STEP = "cell", "probe"  # the kinds of steps in a job
KINDS = (READY, START, CELL, INPUTS, PROBE, DONE, HANG, END)

RESULT_FD, INPUTS_FD = 3, 4  # the worker's descriptors: frames out, probe inputs in
