"""PyTorch and MONAI for the CLI child process: are they installed, which device, installing them.

torch and monai are never imported in Slicer's process (the CLI child process alone uses them),
so every check asks a ``PythonSlicer -c ...`` child, asynchronously and once per session.
Installation runs pip (and light-the-torch) in child processes too, so no restart is needed.
"""

from __future__ import annotations

import json
import logging
import subprocess
from typing import Callable, Optional

import qt
import slicer
from NormativeAnomalyLib.mrml.run_controller import python_executable as pythonExecutable

from .requirements import ProbeResult, torch_requirement

try:
    from slicer.i18n import tr as _
except ImportError:  # Slicer < 5.4
    _ = str

PROBE_PREFIX = "NORMATIVE_ANOMALY_PROBE "
PROBE_TIMEOUT_S = 180  # importing torch and monai the first time after installing can be slow
PROBE_SCRIPT = f"""
import json
info = {{}}
try:
    import torch
    info["torch"] = torch.__version__
    info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    mps = getattr(torch.backends, "mps", None)
    info["mps"] = bool(mps is not None and mps.is_available())
except Exception as error:
    info["torchError"] = f"{{type(error).__name__}}: {{error}}"
try:
    import monai
    info["monai"] = monai.__version__
except Exception as error:
    info["monaiError"] = f"{{type(error).__name__}}: {{error}}"
print({PROBE_PREFIX!r} + json.dumps(info), flush=True)
"""


class DependencyProbe:
    """Asks a child Python which torch, monai and device it has, without blocking the GUI.

    The answer is cached for the session (importing torch takes seconds); ``invalidate()`` after
    installing. A failed probe is not cached, so the next ``start()`` tries again."""

    _cache: Optional[ProbeResult] = None

    def __init__(self) -> None:
        self._process: Optional[subprocess.Popen] = None
        self._callbacks: list[Callable[[ProbeResult], None]] = []
        self._elapsed = qt.QElapsedTimer()
        self._timer = qt.QTimer()
        self._timer.setInterval(250)
        self._timer.connect("timeout()", self._poll)

    @classmethod
    def cached(cls) -> Optional[ProbeResult]:
        return cls._cache

    @classmethod
    def invalidate(cls) -> None:
        cls._cache = None

    @property
    def running(self) -> bool:
        return self._process is not None

    def start(self, callback: Optional[Callable[[ProbeResult], None]] = None) -> None:
        """Probe in the background (if not cached); ``callback(result)`` when the answer is there."""
        if DependencyProbe._cache is not None:
            if callback:
                callback(DependencyProbe._cache)
            return
        if callback:
            self._callbacks.append(callback)
        if self._process is not None:
            return
        try:
            self._process = subprocess.Popen(
                [pythonExecutable(), "-c", PROBE_SCRIPT], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                stdin=subprocess.DEVNULL, text=True, creationflags=getattr(subprocess, "CREATE_NO_WINDOW", 0))
        except OSError as error:
            self._finish({"error": f"cannot start {pythonExecutable()}: {error}"})
            return
        self._elapsed.start()
        self._timer.start()

    def stop(self) -> None:
        self._timer.stop()
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait()
        self._process = None
        self._callbacks = []

    def _poll(self) -> None:
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            if self._elapsed.elapsed() < PROBE_TIMEOUT_S * 1000:
                return
            process.kill()
            process.wait()
            self._finish({"error": f"no answer from {pythonExecutable()} within {PROBE_TIMEOUT_S} s"})
            return
        output = process.communicate()[0] or ""
        line = next((line for line in output.splitlines() if line.startswith(PROBE_PREFIX)), None)
        try:
            result = json.loads(line[len(PROBE_PREFIX):]) if line else {"error": "no answer"}
        except ValueError:
            result = {"error": "unreadable answer"}
        if "error" in result:
            result["error"] += f" (exit status {process.returncode})"
        self._finish(result)

    def _finish(self, result: ProbeResult) -> None:
        self._timer.stop()
        self._process = None
        if "error" not in result:
            DependencyProbe._cache = result
        else:
            logging.warning(f"NormativeAnomaly: PyTorch/MONAI check failed: {result['error']}")
        callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback(result)


def deviceText(result: Optional[ProbeResult]) -> str:
    """What the device label says about the probe's answer."""
    if result is None:
        return _("Detecting the available devices...")
    if "error" in result:
        return _("Devices are detected when the run starts.")
    if not result.get("torch"):
        return _("PyTorch is not installed yet; devices are detected once it is.")
    if result.get("cuda"):
        return _("Detected: CUDA GPU ({name}), PyTorch {version}").format(name=result["cuda"],
                                                                        version=result["torch"])
    if result.get("mps"):
        return _("Detected: Apple MPS GPU, PyTorch {version}").format(version=result["torch"])
    return _("Detected: CPU only (PyTorch {version})").format(version=result["torch"])


def installDependencies(missing: list[str]) -> None:
    """Install the missing requirements (the caller has asked the user). Blocking, with Slicer's pip
    progress display. Raises RuntimeError with a one-line message, for example when offline."""
    torch = torch_requirement()
    if torch in missing:
        _installTorch(torch)
    others = [requirement for requirement in missing if requirement != torch]
    if others:
        packaging = _packagingModule()
        try:
            if packaging is not None:
                packaging.pip_ensure(others, prompt_install=False, requester="NormativeAnomaly")
            else:  # Slicer without slicer.packaging
                slicer.util.pip_install(others)
        except subprocess.CalledProcessError as error:
            raise RuntimeError(_pipFailure(", ".join(others), error)) from None
    DependencyProbe.invalidate()


def _installTorch(requirement: str) -> None:
    """torch as the PyTorch extension's PyTorchUtilsLogic.installTorch installs it (light-the-torch picks
    the wheel matching the NVIDIA driver), but run in a child process only: installTorch imports torch
    into Slicer's process when it is done. Falls back to pip's default torch wheel."""
    try:
        slicer.util.pip_install("light-the-torch>=0.5")
        process = slicer.util.launchConsoleProcess(
            [pythonExecutable(), "-m", "light_the_torch", "install", requirement], useStartupEnvironment=False)
        slicer.util.logProcessOutput(process)
        return
    except (subprocess.CalledProcessError, OSError) as error:
        logging.warning(f"NormativeAnomaly: light-the-torch failed ({error}); installing PyTorch with pip")
    try:
        slicer.util.pip_install(requirement)
    except subprocess.CalledProcessError as error:
        raise RuntimeError(_pipFailure("PyTorch", error)) from None


def _pipFailure(what: str, error: subprocess.CalledProcessError) -> str:
    return _("Could not install {what} (pip exit status {status}). Check the internet connection; "
             "details are in the Python console.").format(what=what, status=error.returncode)


def _packagingModule():
    try:
        import slicer.packaging
    except ImportError:
        return None
    return slicer.packaging
