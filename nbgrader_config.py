"""nbgrader configuration of the MoE course (nbgrader 0.9).

The course is its own nbgrader course directory: `solutions/` holds the source notebooks
(prose, solutions, visible and hidden tests) and `notebooks/` the student release that
`moe-course release` regenerates through nbgrader's own `generate_assignment`.
"""

import os

from nbconvert.preprocessors import CSSHTMLHeaderPreprocessor
from nbgrader.preprocessors import ClearHiddenTests, GetGrades

c = get_config()  # noqa: F821  (injected by traitlets when nbgrader loads this file)

c.CourseDirectory.course_id = "moe_course"
c.CourseDirectory.source_directory = "solutions"
c.CourseDirectory.release_directory = "notebooks"
# The jupytext twins (*.py) of the source notebooks hold the solutions: never release them.
c.CourseDirectory.ignore = [".ipynb_checkpoints", "*.pyc", "__pycache__", "feedback", "*.py"]

# Per-cell time limit when autograding (the key that works in nbgrader 0.9).
c.Execute.timeout = 300
# A kernel that ignores KeyboardInterrupt must not wedge a whole autograde run.
c.Execute.interrupt_on_timeout = True

# nbgrader 0.9's feedback shows the autograded notebook, hidden tests included: strip them,
# so that learners see which hidden checks passed (their output) but never their source.
c.GenerateFeedback.preprocessors = [GetGrades, CSSHTMLHeaderPreprocessor, ClearHiddenTests]

# Hidden tests and solutions use nbgrader's default delimiters.
c.ClearSolutions.code_stub = {"python": "# YOUR CODE HERE\nraise NotImplementedError()"}
c.ClearSolutions.text_stub = "YOUR ANSWER HERE"

# Hidden checks' inputs derive from the course secret (README, "Hidden inputs"): the file
# `.moe_course_secret` beside this config, readable by the instructor only and never
# released. nbgrader's kernels inherit its environment, so the hidden tests cells read the
# secret at check time; `moe-course grade` finds the same file in the course directory.
_SECRET = os.path.join(os.path.dirname(os.path.abspath(__file__)), ".moe_course_secret")
if os.path.isfile(_SECRET):
    os.environ.setdefault("MOE_COURSE_SECRET_FILE", _SECRET)
