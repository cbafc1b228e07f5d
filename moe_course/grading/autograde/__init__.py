"""The graders' machinery: the walls around learner code and the limits of a sandboxed run.

`walls` installs, in the learner's process and before any learner code runs, what the
kernel offers of an unprivileged identity, namespaces, Landlock and seccomp (the system
calls are named there); `limits` holds every limit of a sandboxed run as a field of
`Limits`, from which the command line's options are built. `similarity` reports
near-identical answers for the instructor to review (never a score change).
"""
