"""The study runner guards its output folder: one runner at a time (a lock holding its pid, a stale one taken
over), and a run dies with the runner that started it (it would otherwise train on as an orphan)."""

import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lightning_moe.studies.runner import LOCK_FILE, StudyPaths, _exit_when_orphaned, study_lock
from lightning_moe.studies.spec import StudyError


def test_a_second_runner_is_refused_while_the_first_is_alive(tmp_path):
    paths = StudyPaths(tmp_path, tmp_path)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (tmp_path / LOCK_FILE).write_text(str(other.pid))
        with pytest.raises(StudyError, match=rf"another `lightning-moe study run` \(pid {other.pid}\) is using"):
            with study_lock(paths):
                pass
    finally:
        other.kill()
        other.wait()


def test_a_stale_lock_is_taken_over_and_released(tmp_path, capsys):
    paths = StudyPaths(tmp_path, tmp_path)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (tmp_path / LOCK_FILE).write_text(str(gone.pid))
    with study_lock(paths):
        assert (tmp_path / LOCK_FILE).read_text() == str(os.getpid())
    assert not (tmp_path / LOCK_FILE).exists()
    assert f"stale lock of a runner that is gone (pid {gone.pid})" in capsys.readouterr().err


def _grandchild(pid_file: str) -> None:
    _exit_when_orphaned(os.getppid())
    Path(pid_file).write_text(str(os.getpid()))
    time.sleep(60)


def _middle(pid_file: str) -> None:
    ctx = multiprocessing.get_context("fork")
    ctx.Process(target=_grandchild, args=(pid_file,)).start()
    while not Path(pid_file).exists():
        time.sleep(0.05)
    os._exit(0)  # the "runner" dies without cleaning up, as under SIGKILL


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "State:\tZ" not in state  # a zombie has exited; only its parent's wait is missing


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads process states from /proc (Linux)")
def test_a_run_exits_when_the_process_that_started_it_dies(tmp_path):
    pid_file = tmp_path / "pid"
    middle = multiprocessing.get_context("fork").Process(target=_middle, args=(str(pid_file),))
    middle.start()
    middle.join(30)
    pid = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while _running(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _running(pid)
