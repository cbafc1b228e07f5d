"""`moe-course lab` starts JupyterLab without the "Jupyter news?" prompt, through the course's
own settings folder: a real JupyterLab server, asked through its settings API."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from moe_course import cli

NOTIFICATION = "@jupyterlab/apputils-extension:notification"


def test_the_overrides_silence_the_news_prompt_and_the_update_check() -> None:
    folder = cli.lab_settings_dir()
    overrides = json.loads((folder / "overrides.json").read_text())
    assert overrides[NOTIFICATION] == {"fetchNews": "false", "checkForUpdates": False}
    assert folder == cli.course_root() / ".jupyter" / "lab-settings"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_lab_serves_fetch_news_false_and_leaves_the_user_settings_alone(tmp_path: Path) -> None:
    env = dict(os.environ)
    for key in ("JUPYTER_CONFIG_DIR", "JUPYTER_DATA_DIR", "JUPYTER_RUNTIME_DIR",
                "JUPYTERLAB_SETTINGS_DIR", "JUPYTERLAB_WORKSPACES_DIR"):
        env[key] = str(tmp_path / key.lower())
        Path(env[key]).mkdir()
    port, token = _free_port(), "moe-course-test"
    server = subprocess.Popen(
        [sys.executable, "-m", "moe_course.cli", "lab", "--no-browser", f"--port={port}",
         f"--IdentityProvider.token={token}", "--ServerApp.open_browser=False"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}/lab/api/settings/{NOTIFICATION}?token={token}"
    try:
        deadline, reply = time.monotonic() + 60, None
        while time.monotonic() < deadline and server.poll() is None:
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    reply = json.load(response)
                break
            except OSError:
                time.sleep(0.5)
        assert reply is not None, f"JupyterLab did not answer: {server.poll()}"
        # Overrides become the schema's defaults, which the learner's (empty) settings keep.
        defaults = {k: v.get("default") for k, v in reply["schema"]["properties"].items()}
        assert defaults["fetchNews"] == "false" and defaults["checkForUpdates"] is False
        assert reply["settings"] == {}
        # The learner's own settings folder holds nothing the course wrote.
        assert not any(Path(env["JUPYTERLAB_SETTINGS_DIR"]).rglob("*"))
    finally:
        server.terminate()
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
