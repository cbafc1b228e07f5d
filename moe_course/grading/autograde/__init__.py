"""The pytest grader's own layer (see shared/DESIGN.md, "Grading package layout")."""
