"""Probes and judges of the course's exercises, one module per notebook (nbNN_<assignment>).

Each module imports the grading core (`probe`, `inputs`, `recording`, `guard`) and the
reference package, and `common` for what several notebooks share; never another
notebook's checks. The registry (`moe_course.grading.registry`) lists their probes.
"""
