"""A class on JupyterHub, end to end: real users, nbgrader's exchange, a real browser.

A real JupyterHub (PyPI `jupyterhub`, npm `configurable-http-proxy`) on 127.0.0.1 with free
ports; one instructor and three students made with `useradd` (unique names per run, removed
with `userdel -r` at the end); a password-only DummyAuthenticator (no PAM); the
LocalProcessSpawner starting `jupyterhub-singleuser` (JupyterLab) as each user; the course
installed once for all of them: its wheel (no `solutions/`) installed with `pip --target`
into a folder on every user's PYTHONPATH, over this test's interpreter (made reachable by
every user: `chmod o+x` on the folders above it that lack it, restored at the end);
nbgrader's exchange under a temporary root, configured in a system-wide
`nbgrader_config.py` found through `JUPYTER_CONFIG_PATH`.

The story, as docs/instructors.md tells it (its commands are the ones run here):

1. the instructor's course folder is built from `solutions/`; `nbgrader generate_assignment`
   and `nbgrader release_assignment` put notebook 01 in the exchange;
2. in headless Chromium, each student logs in, opens the Assignments tab (nbgrader's lab
   extension) and clicks Fetch; the answers are written through the Jupyter contents API in
   the student's own browser session (A: the solution's answers; B: a wrong `softmax_gate`;
   C: the blank release); then Submit is clicked;
3. the instructor runs `nbgrader collect` and `nbgrader autograde`, opens the formgrader in
   the browser and gives the written answer `ex01_written` its points there, then
   `nbgrader generate_feedback` and `nbgrader release_feedback`;
4. student A runs `nbgrader fetch_feedback`; the feedback shows no hidden test's source;
5. `nbgrader export` totals are checked, and `moe-course grade` on the collected
   `submitted/` tree gives the same autograded points per exercise as nbgrader's gradebook.

Everything (users, their processes, the hub and its proxy) is cleaned up in a `finally`.
Where the time went is printed at the end. It skips only where it cannot run: not root, no
`useradd`, no node/npm. `configurable-http-proxy` is installed with npm into
`<sys.prefix>/node_modules` when it is not on PATH.
"""

from __future__ import annotations

import csv
import json
import os
import re
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest
from test_browser import CHROMIUM, CHROMIUM_ARGS  # one browser recipe for both

pytestmark = [pytest.mark.slow, pytest.mark.browser]

REPO = Path(__file__).resolve().parents[1]
ASSIGNMENT = "01_experts_and_gating"
NOTEBOOK = "experts_and_gating"
SOURCE = REPO / "solutions" / ASSIGNMENT / f"{NOTEBOOK}.ipynb"
PASSWORD = "moe-course-" + secrets.token_hex(4)
WRITTEN_POINTS = {"A": 1, "B": 0.5, "C": 0}  # given by hand in the formgrader
# the wrong answer of student B: a softmax over tokens instead of over experts
WRONG_SOFTMAX_GATE = ('def softmax_gate(x, w_gate):\n'
                      '    """(T, D), (D, E) -> (T, E): softmax(x @ w_gate) over experts."""\n'
                      '    return torch.softmax(x @ w_gate, dim=0)')
TIMES: dict[str, float] = {}
# the interpreter's scripts (nbgrader runs `alembic`): the venv's and its base's bin folders
BIN_PATH = os.pathsep.join(dict.fromkeys(
    str(p) for p in (Path(sys.executable).parent, Path(sys.executable).resolve().parent)))


def jupyter_paths(config_dir: Path) -> dict[str, str]:
    """JUPYTER_CONFIG_PATH and JUPYTER_PATH for the users' servers and commands.

    The class's nbgrader_config.py comes first; a venv made with --system-site-packages
    also needs its base's folders, where JupyterLab and nbgrader enable their extensions.
    """
    config, data = [str(config_dir)], []
    for prefix in dict.fromkeys((sys.prefix, sys.base_prefix)):
        config.append(os.path.join(prefix, "etc", "jupyter"))
        data.append(os.path.join(prefix, "share", "jupyter"))
    return {"JUPYTER_CONFIG_PATH": os.pathsep.join(config), "JUPYTER_PATH": os.pathsep.join(data)}


def _mark(name: str, t0: float) -> None:
    TIMES[name] = round(time.monotonic() - t0, 1)
    print(f"[{TIMES[name]:7.1f}s] {name}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _why_not() -> str | None:
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "needs root: it creates local users with useradd and spawns servers as them"
    for tool in ("useradd", "userdel"):
        if shutil.which(tool) is None:
            return f"needs `{tool}` (package passwd) to create the class's local users"
    if shutil.which("node") is None or shutil.which("npm") is None:
        return "needs node and npm for configurable-http-proxy (apt-get install -y nodejs npm)"
    return None


def configurable_http_proxy() -> str:
    """The proxy's command: on PATH, or installed with npm into `<sys.prefix>/node_modules`."""
    found = shutil.which("configurable-http-proxy")
    if found:
        return found
    local = Path(sys.prefix) / "node_modules" / ".bin" / "configurable-http-proxy"
    if not local.exists():
        subprocess.run(["npm", "install", "--prefix", sys.prefix, "--no-audit", "--no-fund",
                        "--loglevel=error", "configurable-http-proxy"], check=True, timeout=300)
    return str(local)


def nbgrader_cmd(*args: str) -> list[str]:
    """`nbgrader ARGS...` with this test's interpreter (the one that has moe_course)."""
    return [sys.executable, "-m", "nbgrader", *args]


def moe_course_cmd(*args: str) -> list[str]:
    """`moe-course ARGS...` with this test's interpreter."""
    return [sys.executable, "-m", "moe_course.cli", *args]


class Class:
    """The local users of one run, the folders the hub needs, and their cleanup."""

    def __init__(self) -> None:
        tag = secrets.token_hex(3)
        self.instructor = f"moei{tag}"
        self.students = {k: f"moe{k.lower()}{tag}" for k in "ABC"}
        self.root = Path(tempfile.mkdtemp(prefix="moe-hub-"))
        self.root.chmod(0o755)  # the users read the system-wide config under it
        self.exchange = self.root / "exchange"
        self.config_dir = self.root / "etc" / "jupyter"
        self.site = self.root / "site"  # the course's wheel, installed for every user
        self.made: list[str] = []
        self.chmodded: list[tuple[Path, int]] = []

    @property
    def users(self) -> list[str]:
        return [self.instructor, *self.students.values()]

    def home(self, user: str) -> Path:
        return Path("/home") / user

    def make_users(self) -> None:
        for user in self.users:
            subprocess.run(["useradd", "--create-home", "--shell", "/bin/bash", user],
                           check=True, timeout=60)
            self.made.append(user)

    def open_path(self, path: Path) -> None:
        """Let every user traverse the folders above `path` (o+x), remembering old modes."""
        for parent in [path, *path.parents]:
            if not parent.is_dir():
                continue
            mode = parent.stat().st_mode
            if not mode & stat.S_IXOTH:
                self.chmodded.append((parent, stat.S_IMODE(mode)))
                parent.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)

    def env(self, user: str) -> dict[str, str]:
        home = self.home(user)
        return {"PATH": f"{BIN_PATH}:/usr/local/bin:/usr/bin:/bin",
                "HOME": str(home), "USER": user, "LOGNAME": user, "LANG": "C.UTF-8",
                **jupyter_paths(self.config_dir), "OMP_NUM_THREADS": "1",
                "PYTHONPATH": str(self.site),
                "PYTHONDONTWRITEBYTECODE": "1"}

    def run_as(self, user: str, cmd: list[str], cwd: Path, timeout: float = 600,
               check: bool = True) -> subprocess.CompletedProcess:
        """Run `cmd` as `user` (uid, gid, HOME) in `cwd`; print its command and output."""
        print("  $", user, "@", cwd, ":", " ".join(cmd[2:] if cmd[0] == sys.executable
                                                     else cmd), flush=True)
        proc = subprocess.run(cmd, cwd=cwd, env=self.env(user), user=user, group=user,
                              extra_groups=[], umask=0o022, capture_output=True, text=True,
                              timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"{cmd} as {user} failed ({proc.returncode}):\n"
                                 f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
        return proc

    def kill_user_processes(self) -> list[int]:
        """SIGKILL every process, by pid, owned by this run's users (servers, kernels)."""
        import pwd

        uids = set()
        for user in self.made:
            try:
                uids.add(pwd.getpwnam(user).pw_uid)
            except KeyError:
                pass
        killed = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if entry.stat().st_uid in uids:
                    os.kill(int(entry.name), signal.SIGKILL)
                    killed.append(int(entry.name))
            except (OSError, ProcessLookupError):
                pass
        return killed

    def cleanup(self) -> None:
        killed = self.kill_user_processes()
        if killed:
            time.sleep(0.5)
            print(f"killed leftover processes of the class's users: {killed}")
        for user in self.made:
            subprocess.run(["userdel", "-r", user], capture_output=True, timeout=60)
        for path, mode in reversed(self.chmodded):
            path.chmod(mode)
        shutil.rmtree(self.root, ignore_errors=True)


# ----------------------------------------------------------------------------------------
# Notebook content of the three submissions


def _cells_by_id(nb: dict) -> dict[str, dict]:
    return {c["metadata"]["nbgrader"]["grade_id"]: c for c in nb["cells"]
            if c.get("metadata", {}).get("nbgrader", {}).get("grade_id")}


def _strip_solution_markers(source: str) -> str:
    return "\n".join(line for line in source.splitlines()
                     if line.strip() not in ("### BEGIN SOLUTION", "### END SOLUTION",
                                             "<!-- BEGIN SOLUTION -->", "<!-- END SOLUTION -->"))


def answered(release: dict, who: str) -> dict:
    """The fetched notebook with student `who`'s answers in its solution cells."""
    nb = json.loads(json.dumps(release))
    if who == "C":
        return nb
    source = _cells_by_id(json.loads(SOURCE.read_text()))
    for grade_id, cell in _cells_by_id(nb).items():
        if cell["metadata"]["nbgrader"].get("solution"):
            cell["source"] = _strip_solution_markers("".join(source[grade_id]["source"]))
    if who == "B":
        _cells_by_id(nb)["ex01_softmax_gate"]["source"] = WRONG_SOFTMAX_GATE
    return nb


# ----------------------------------------------------------------------------------------
# The browser


def login(page, base: str, user: str) -> None:
    page.goto(f"{base}/hub/login", wait_until="domcontentloaded")
    page.fill("#username_input", user)
    page.fill("#password_input", PASSWORD)
    page.click("#login_submit")
    # the hub spawns the server and redirects to JupyterLab
    page.wait_for_url(re.compile(rf".*/user/{user}/lab.*"), timeout=180_000)
    page.wait_for_selector("#jp-main-dock-panel", timeout=180_000)


def open_assignments(page) -> None:
    """The Assignments tab of nbgrader's lab extension, through the command palette."""
    for _ in range(3):
        page.click("#jp-main-dock-panel")
        page.keyboard.press("Control+Shift+c")
        item = page.locator("#modal-command-palette "
                            "li[data-command='nbgrader:open-assignment-list']")
        try:
            item.click(timeout=15_000)
            break
        except Exception:
            page.keyboard.press("Escape")
    page.wait_for_selector(".lm-TabBar-tab .lm-TabBar-tabLabel:text-is('Assignments')",
                           timeout=30_000)


def list_rows(page, name: str, count: int, timeout: float = 120_000):
    rows = page.locator(f"#{name}_assignments_list > .list_item")
    page.wait_for_function(
        f"() => document.querySelectorAll('#{name}_assignments_list > .list_item').length"
        f" === {count}", timeout=timeout)
    return rows


def contents_api(page, method: str, url: str, body: dict | None = None) -> dict:
    """The Jupyter contents API in the user's own browser session (cookie and _xsrf)."""
    status, text = page.evaluate(
        """async ([method, url, body]) => {
            const m = document.cookie.match(/(?:^|; )_xsrf=([^;]*)/);
            const headers = {'Content-Type': 'application/json'};
            if (m) headers['X-XSRFToken'] = decodeURIComponent(m[1]);
            const r = await fetch(url, {method, headers, credentials: 'same-origin',
                                        body: body === null ? undefined : body});
            return [r.status, await r.text()];
        }""", [method, url, None if body is None else json.dumps(body)])
    assert status in (200, 201), f"{method} {url}: {status} {text[:500]}"
    return json.loads(text)


def student_fetches_and_submits(browser, base: str, user: str, who: str) -> None:
    page = browser.new_page()
    try:
        login(page, base, user)
        open_assignments(page)
        page.locator("#refresh_assignments_list").click()
        rows = list_rows(page, "released", 1)
        assert ASSIGNMENT in rows.first.inner_text()
        rows.first.locator(".item_status button").click()  # Fetch
        rows = list_rows(page, "fetched", 1)
        url = f"{base}/user/{user}/api/contents/{ASSIGNMENT}/{NOTEBOOK}.ipynb"
        release = contents_api(page, "GET", url)["content"]
        contents_api(page, "PUT", url, {"type": "notebook", "format": "json",
                                        "content": answered(release, who)})
        rows.first.locator('.item_status button:text("Submit")').click()
        rows = list_rows(page, "submitted", 1)
        assert ASSIGNMENT in rows.first.inner_text()
    except Exception:
        page.screenshot(path=f"/tmp/moe-hub-failure-{who}.png")
        print(f"screenshot: /tmp/moe-hub-failure-{who}.png")
        raise
    finally:
        page.close()


def grade_written_answers(browser, base: str, instructor: str, ids: dict[str, str]) -> None:
    """The instructor gives `ex01_written` its points in the formgrader, in the browser."""
    page = browser.new_page()
    try:
        login(page, base, instructor)
        page.goto(f"{base}/user/{instructor}/formgrader/gradebook/{ASSIGNMENT}/{NOTEBOOK}",
                  wait_until="domcontentloaded")
        page.wait_for_selector("table", timeout=60_000)
        for who, submission_id in ids.items():
            # the score boxes are in the page before the formgrader's script has loaded the
            # grades and bound them (a value typed earlier is never saved): wait for the
            # network to settle, and type again if no save follows
            page.goto(f"{base}/user/{instructor}/formgrader/submissions/{submission_id}",
                      wait_until="networkidle", timeout=120_000)
            score = page.locator("input.score#ex01_written")
            score.wait_for(timeout=60_000)
            api = f"{base}/user/{instructor}/formgrader/api/grades?submission_id={submission_id}"

            def saved(api: str = api) -> float | None:
                grades = page.request.get(api).json()
                (grade,) = [g for g in grades if g["name"] == "ex01_written"]
                return grade["manual_score"]

            for attempt in range(4):
                if attempt:  # a different value first, so that the next one is a change
                    score.fill("0.25")
                    score.press("Tab")
                    page.wait_for_timeout(2000)
                score.fill(f"{WRITTEN_POINTS[who]:g}")
                score.press("Tab")  # the change event saves the grade (PUT api/grade/<id>)
                deadline = time.monotonic() + 20
                while time.monotonic() < deadline and saved() != WRITTEN_POINTS[who]:
                    page.wait_for_timeout(500)
                if saved() == WRITTEN_POINTS[who]:
                    break
            else:
                raise AssertionError(f"the formgrader did not save {who}'s written points")
    except Exception:
        page.screenshot(path="/tmp/moe-hub-failure-formgrader.png")
        print("screenshot: /tmp/moe-hub-failure-formgrader.png")
        raise
    finally:
        page.close()


# ----------------------------------------------------------------------------------------
# The hub


def hub_config(cls: Class, port: int, hub_port: int, api_port: int, chp: str) -> str:
    return f"""
c = get_config()  # noqa
c.JupyterHub.bind_url = "http://127.0.0.1:{port}"
c.JupyterHub.hub_ip = "127.0.0.1"
c.JupyterHub.hub_port = {hub_port}
c.ConfigurableHTTPProxy.api_url = "http://127.0.0.1:{api_port}"
c.ConfigurableHTTPProxy.command = [{chp!r}]
c.ConfigurableHTTPProxy.pid_file = {str(cls.root / "proxy.pid")!r}
c.JupyterHub.db_url = "sqlite:///{cls.root / "hub.sqlite"}"
c.JupyterHub.cookie_secret_file = {str(cls.root / "cookie_secret")!r}
c.JupyterHub.authenticator_class = "dummy"
c.DummyAuthenticator.password = {PASSWORD!r}
c.Authenticator.allowed_users = {set(cls.users)!r}
c.JupyterHub.spawner_class = "localprocess"
c.Spawner.cmd = [{sys.executable!r}, "-m", "jupyterhub.singleuser"]
c.Spawner.default_url = "/lab"
c.Spawner.ip = "127.0.0.1"
c.Spawner.start_timeout = 240
c.Spawner.http_timeout = 240
c.Spawner.environment = {{**{jupyter_paths(cls.config_dir)!r}, "OMP_NUM_THREADS": "1",
                          "PYTHONPATH": {str(cls.site)!r}}}
c.JupyterHub.cleanup_servers = True
"""


def test_a_class_on_jupyterhub(tmp_path):
    reason = _why_not()
    if reason:
        pytest.skip(reason)
    if not CHROMIUM.exists():
        pytest.fail("Chromium is missing at /usr/bin/chromium: `apt-get install -y chromium`")
    from nbgrader.api import Gradebook
    from playwright.sync_api import sync_playwright

    t0 = time.monotonic()
    cls = Class()
    hub = None
    try:
        chp = configurable_http_proxy()
        _mark("configurable-http-proxy ready", t0)
        cls.make_users()
        for path in (Path(sys.executable), Path(sys.executable).resolve(), Path(sys.prefix),
                     REPO, cls.root):
            cls.open_path(path)
        # the system-wide nbgrader config: the exchange and the course id
        cls.exchange.mkdir()
        cls.exchange.chmod(0o777)
        cls.config_dir.mkdir(parents=True)
        (cls.config_dir / "nbgrader_config.py").write_text(
            "c = get_config()  # noqa\n"
            f"c.Exchange.root = {str(cls.exchange)!r}\n"
            'c.CourseDirectory.course_id = "moe_course"\n')
        # the course for all users: a wheel (the package, never solutions/), installed once
        # into a folder every user reads, put first on their PYTHONPATH
        dist = cls.root / "dist"
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                        str(dist), str(REPO)], check=True, timeout=600, cwd=cls.root)
        (wheel,) = dist.glob("moe_course-*.whl")
        shipped = zipfile.ZipFile(wheel).namelist()
        assert any(n.startswith("moe_course/") for n in shipped)
        assert not any(n.startswith(("solutions/", "notebooks/", "tests/")) for n in shipped)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                        str(cls.site), str(wheel)], check=True, timeout=600)
        # every user imports that course and nbgrader (one student checks it here; the
        # others' servers and the instructor's nbgrader do it below)
        a_home = cls.home(cls.students["A"])
        found = cls.run_as(cls.students["A"], [sys.executable, "-c",
                           "import moe_course, nbgrader; print(moe_course.__file__)"],
                           a_home, timeout=300).stdout.strip()
        assert found.startswith(str(cls.site)), found
        _mark(f"users made ({', '.join(cls.users)}); course importable by all", t0)

        # the instructor's course folder, built from solutions/
        instr = cls.instructor
        course = cls.home(instr) / "moe_course"
        course.mkdir()
        shutil.copy(REPO / "nbgrader_config.py", course / "nbgrader_config.py")
        shutil.copytree(REPO / "solutions" / ASSIGNMENT, course / "solutions" / ASSIGNMENT,
                        ignore=shutil.ignore_patterns("*.py", ".ipynb_checkpoints"))
        jupyter_dir = cls.home(instr) / ".jupyter"
        jupyter_dir.mkdir()
        (jupyter_dir / "nbgrader_config.py").write_text(
            "c = get_config()  # noqa\n"
            f"c.CourseDirectory.root = {str(course)!r}\n"
            f"load_subconfig({str(course / 'nbgrader_config.py')!r})\n")
        subprocess.run(["chown", "-R", f"{instr}:{instr}", str(course), str(jupyter_dir)],
                       check=True)
        cls.run_as(instr, nbgrader_cmd("generate_assignment", ASSIGNMENT), course)
        cls.run_as(instr, nbgrader_cmd("release_assignment", ASSIGNMENT), course)
        assert (cls.exchange / "moe_course" / "outbound" / ASSIGNMENT / f"{NOTEBOOK}.ipynb"
                ).exists()
        _mark("generate_assignment + release_assignment", t0)

        port, hub_port, api_port = free_port(), free_port(), free_port()
        (cls.root / "jupyterhub_config.py").write_text(
            hub_config(cls, port, hub_port, api_port, chp))
        log_path = cls.root / "hub.log"
        with open(log_path, "w") as log:
            hub = subprocess.Popen(
                [sys.executable, "-m", "jupyterhub", "-f", str(cls.root / "jupyterhub_config.py")],
                cwd=cls.root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                env=dict(os.environ, PATH=f"{BIN_PATH}:{os.environ['PATH']}"))
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{base}/hub/api", timeout=2)
                break
            except OSError:
                if hub.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"JupyterHub did not start; its log:\n{log_path.read_text()}")
                time.sleep(0.5)
        _mark(f"JupyterHub up at {base}", t0)

        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                        args=CHROMIUM_ARGS)
            try:
                for who, user in cls.students.items():
                    context = browser.new_context(viewport={"width": 1280, "height": 900})
                    try:
                        student_fetches_and_submits(context, base, user, who)
                    finally:
                        context.close()
                    _mark(f"student {who} ({user}) fetched and submitted in the browser", t0)

                cls.run_as(instr, nbgrader_cmd("collect", ASSIGNMENT), course)
                submitted = course / "submitted"
                assert sorted(p.name for p in submitted.iterdir()) == sorted(
                    cls.students.values())
                _mark("nbgrader collect", t0)
                cls.run_as(instr, nbgrader_cmd("autograde", ASSIGNMENT), course, timeout=900)
                _mark("nbgrader autograde", t0)

                db_url = f"sqlite:///{course / 'gradebook.db'}"
                with Gradebook(db_url) as gb:
                    ids = {who: gb.find_submission_notebook(NOTEBOOK, ASSIGNMENT, user).id
                           for who, user in cls.students.items()}
                context = browser.new_context(viewport={"width": 1280, "height": 900})
                try:
                    grade_written_answers(context, base, instr, ids)
                finally:
                    context.close()
                _mark("written answers graded in the formgrader", t0)
            finally:
                browser.close()

        with Gradebook(db_url) as gb:
            nbgrader_points: dict[str, dict[str, float]] = {}
            written: dict[str, float] = {}
            for who, user in cls.students.items():
                nb = gb.find_submission_notebook(NOTEBOOK, ASSIGNMENT, user)
                for grade in nb.grades:
                    if grade.name == "ex01_written":
                        written[who] = grade.score
                    else:  # ex01_<x>_tests grades the answer cell ex01_<x>
                        nbgrader_points.setdefault(user, {})[
                            grade.name.removesuffix("_tests")] = grade.score
        assert written == {k: float(v) for k, v in WRITTEN_POINTS.items()}

        cls.run_as(instr, nbgrader_cmd("generate_feedback", ASSIGNMENT), course)
        cls.run_as(instr, nbgrader_cmd("release_feedback", ASSIGNMENT), course)
        a = cls.students["A"]
        cls.run_as(a, nbgrader_cmd("fetch_feedback", ASSIGNMENT), cls.home(a))
        pages = list((cls.home(a) / ASSIGNMENT / "feedback").rglob(f"{NOTEBOOK}.html"))
        assert len(pages) == 1, pages
        feedback = pages[0].read_text()
        assert "softmax_gate" in feedback and "ex01_written" in feedback
        for hidden in ("BEGIN HIDDEN TESTS", "hidden=True"):
            assert hidden not in feedback, f"the feedback shows hidden-test source ({hidden})"
        _mark("generate_feedback + release_feedback + fetch_feedback", t0)

        cls.run_as(instr, nbgrader_cmd("export"), course)
        with open(course / "grades.csv") as f:
            exported = {row["student_id"]: row for row in csv.DictReader(f)}
        autograded = {u: sum(nbgrader_points[u].values()) for u in cls.students.values()}
        for who, user in cls.students.items():
            assert float(exported[user]["max_score"]) == 6.0
            assert float(exported[user]["score"]) == autograded[user] + WRITTEN_POINTS[who]
        assert autograded[cls.students["A"]] == 5.0
        assert autograded[cls.students["C"]] == 0.0
        assert nbgrader_points[cls.students["B"]]["ex01_softmax_gate"] == 0.0
        assert 0 < autograded[cls.students["B"]] < 5.0
        _mark("nbgrader export", t0)

        out = tmp_path / "grades"
        proc = subprocess.run(moe_course_cmd("grade", str(submitted), "--out", str(out)),
                              capture_output=True, text=True, timeout=900,
                              env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert proc.returncode == 0, proc.stdout + proc.stderr
        ours: dict[str, dict[str, float]] = {}
        with open(out / "grades.csv") as f:
            for row in csv.DictReader(f):
                assert row["assignment"] == ASSIGNMENT
                ours.setdefault(row["student"], {})[row["exercise"]] = float(row["score"])
        assert ours == nbgrader_points, (ours, nbgrader_points)
        _mark("moe-course grade on submitted/ agrees with nbgrader, exercise by exercise", t0)
    finally:
        if hub is not None and hub.poll() is None:
            os.killpg(hub.pid, signal.SIGTERM)  # the hub stops the servers and the proxy
            try:
                hub.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(hub.pid, signal.SIGKILL)
                hub.wait(10)
        pid_file = cls.root / "proxy.pid"
        if pid_file.exists():
            try:
                os.kill(int(pid_file.read_text().strip()), signal.SIGTERM)
            except (OSError, ValueError):
                pass
        log_path = cls.root / "hub.log"
        if log_path.exists():
            print("the hub's log (last lines):\n" + "\n".join(
                log_path.read_text(errors="replace").splitlines()[-40:]))
        cls.cleanup()
        _mark("cleaned up users, processes and folders", t0)
        steps = list(TIMES.items())
        print("where the time went:")
        previous = 0.0
        for name, at in steps:
            print(f"  {at - previous:7.1f}s  {name}")
            previous = at
