"""``normative-anomaly run`` in a child process, so a GUI stays responsive.

The Slicer module (as SlicerMONAIAuto3DSeg does) runs the CLI in its own Python process:
torch's threads and memory stay out of Slicer's process, a crash cannot take the scene
with it, and Cancel can always stop the work. The child prints progress lines
(``--progress-lines``); a reader thread collects them so ``poll()`` never blocks.
The child runs in its own process group (POSIX session / Windows process group) because
Slicer's ``PythonSlicer`` is a launcher that starts the real interpreter as its own child and
does not forward signals: Cancel signals the whole group. On POSIX that is SIGTERM, which
the CLI turns into a clean unwind (its staging folder is removed), then SIGKILL for whatever
is still alive after a grace period; on Windows the tree is ended with ``taskkill /T``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .options import RunOptions
from .run_folder import parse_progress_line

LIBRARY_PARENT = Path(__file__).resolve().parent.parent  # the folder holding NormativeAnomalyLib
CLI_MODULE = "NormativeAnomalyLib.cli"


@dataclass(frozen=True)
class RunState:
    stage: str  # last stage reported ("starting" before the first)
    fraction: float  # of the whole run, 0..1
    running: bool
    returncode: int | None  # None while running
    message: str  # the child's last line: its one-line error after a failure


def run_command(input_path: str | os.PathLike, out_dir: str | os.PathLike, model: str | None = None,
                options: RunOptions | None = None, mask_path: str | os.PathLike | None = None,
                python: str | None = None) -> list[str]:
    """The argv of a ``normative-anomaly run`` with progress lines, writing what a front end reads back."""
    command = [python or sys.executable, "-m", CLI_MODULE, "run", str(input_path), "--out", str(out_dir),
               "--progress-lines", "--maps-only"]
    if model:
        command += ["--model", model]
    if mask_path:
        command += ["--mask", str(mask_path)]
    return command + (options or RunOptions()).to_argv()


class BackgroundRun:
    def __init__(self, command: Sequence[str], env: dict[str, str] | None = None) -> None:
        environment = dict(os.environ if env is None else env)
        environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(LIBRARY_PARENT),
                                                                  environment.get("PYTHONPATH")]))
        environment["PYTHONUNBUFFERED"] = "1"
        environment["PYTHONIOENCODING"] = "utf-8"  # read back as UTF-8 below, whatever the locale
        # No console window on Windows (what slicer.util.launchConsoleProcess also does).
        flags = getattr(subprocess, "CREATE_NO_WINDOW", 0) | getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0)
        self.process = subprocess.Popen(list(command), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, text=True, encoding="utf-8", errors="replace",
                                        bufsize=1, env=environment,
                                        creationflags=flags, start_new_session=os.name == "posix")
        self.lines: deque[str] = deque(maxlen=200)  # the child's log, progress lines excepted
        self._stage, self._fraction = "starting", 0.0
        self._kill_at: float | None = None  # when a requested cancel turns to SIGKILL
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, name="normative-anomaly-run", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            line = line.rstrip("\n")
            progress = parse_progress_line(line)
            with self._lock:
                if progress is None:
                    if line.strip():
                        self.lines.append(line)
                else:
                    self._stage, self._fraction = progress[0], progress[2]
        self.process.stdout.close()

    def poll(self) -> RunState:
        returncode = self.process.poll()
        if returncode is not None:
            self._reader.join(timeout=5)  # the last lines, including a final error
        with self._lock:
            message = self.lines[-1] if self.lines else ""
            fraction = 1.0 if returncode == 0 else self._fraction
            return RunState(self._stage, fraction, returncode is None, returncode, message)

    def wait(self, timeout: float | None = None) -> RunState:
        self.process.wait(timeout)
        return self.poll()

    def cancel(self, grace_seconds: float = 10.0) -> RunState:
        """Stop the child and its children, waiting for them: see ``request_cancel``."""
        self.request_cancel(grace_seconds)
        while not self.cancel_done():
            time.sleep(0.05)
        self.process.wait()
        return self.poll()

    def request_cancel(self, grace_seconds: float = 10.0) -> None:
        """Start stopping the child and its children without waiting (a GUI thread must not block):
        SIGTERM now (the CLI cleans up); ``cancel_done`` sends SIGKILL once ``grace_seconds`` are over."""
        if self._kill_at is not None:
            return
        self._kill_at = time.monotonic() + grace_seconds
        if os.name != "posix":  # the whole tree at once: Windows has no graceful signal for it
            if self.process.poll() is None:
                subprocess.run(["taskkill", "/PID", str(self.process.pid), "/T", "/F"], capture_output=True,
                               creationflags=getattr(subprocess, "CREATE_NO_WINDOW", 0))
            return
        _signal_group(self.process.pid, signal.SIGTERM)  # start_new_session: the child leads its group

    def cancel_done(self) -> bool:
        """After ``request_cancel``: whether the child and its children are gone. Never blocks; call it
        again (a timer) until it says so."""
        if self._kill_at is None:
            raise RuntimeError("request_cancel() first")
        self.process.poll()  # reap our direct child, so that it does not linger as a zombie
        alive = _group_alive(self.process.pid) if os.name == "posix" else self.process.poll() is None
        if alive and time.monotonic() >= self._kill_at and os.name == "posix":
            _signal_group(self.process.pid, signal.SIGKILL)
        return not alive

    def log(self) -> str:
        with self._lock:
            return "\n".join(self.lines)


def _signal_group(group: int, signal_number: int) -> None:
    try:
        os.killpg(group, signal_number)
    except (ProcessLookupError, PermissionError):
        pass  # already gone


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False
