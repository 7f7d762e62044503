"""``normative-anomaly serve``: start the web app. The command is this package's to add
(``register_command``, found by the CLI through the ``normative_anomaly.commands`` entry point).

Safe by default: it listens on 127.0.0.1 only, shares only the bundled sample data and the
folders given with ``--data-dir``, and keeps uploads and downloads in its own work folder,
removed when it stops.
"""

from __future__ import annotations

import argparse
import ipaddress
import sys
from pathlib import Path

from NormativeAnomalyLib.options import DEVICES, RunOptions

DEFAULT_PORT = 8080
MAX_PORT = 65535


def register_command(commands: argparse._SubParsersAction) -> None:
    """Add ``serve`` to the CLI's commands."""
    command = commands.add_parser("serve", help="the web app: open the printed address in a browser "
                                  "(needs the web requirements, docs/web.md)")
    add_arguments(command)
    command.set_defaults(run_command=run_command)


def run_command(args: argparse.Namespace) -> int:
    from NormativeAnomalyLib.errors import NormativeAnomalyError

    try:
        import trame_slicer  # noqa: F401
    except ImportError as error:
        raise NormativeAnomalyError(f"the web app needs its requirements ({error.name} is missing): "
                                    "pip install -r requirements-web.txt") from None
    return serve(args)


def port_number(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= port <= MAX_PORT:
        raise argparse.ArgumentTypeError(f"{text} is not a port number (0 to {MAX_PORT})")
    return port


def add_arguments(command: argparse.ArgumentParser) -> None:
    from NormativeAnomalyLib.cli import positive_number

    command.add_argument("--port", type=port_number, default=DEFAULT_PORT,
                         help=f"port (default {DEFAULT_PORT}; 0: any free)")
    command.add_argument("--host", default="127.0.0.1",
                         help="address to listen on (default 127.0.0.1: this machine only; see docs/web.md before "
                              "opening it to a network)")
    command.add_argument("--input", type=Path, help="volume to open at start (default: the demo case)")
    command.add_argument("--data-dir", type=Path, action="append", default=[],
                         help="a folder whose volumes the page may open (repeatable); the bundled sample data "
                              "is always shared")
    command.add_argument("--max-upload-mb", type=positive_number, default=512,
                         help="largest upload accepted (default 512)")
    command.add_argument("--work-dir", type=Path,
                         help="folder for uploads, runs and downloads (default: a new temporary folder, removed "
                              "at exit)")
    command.add_argument("--device", default=RunOptions.device, choices=DEVICES)
    command.add_argument("--render", default="auto", choices=["auto", "osmesa", "egl"],
                         help="offscreen rendering: osmesa (CPU, needs libosmesa6), egl (GPU); auto: without a "
                              "display, egl when an NVIDIA GPU and libEGL are present, else osmesa")


def exposure_warning(host: str) -> str | None:
    """A one-line warning when the server would be reachable from other machines: it has no login."""
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if loopback:
        return None
    return (f"normative-anomaly: warning: listening on {host}: anyone who can reach this port can use the app "
            "(no login); put it behind an authenticating proxy (docs/web.md)")


def serve(args: argparse.Namespace) -> int:
    from NormativeAnomalyLib.errors import InputVolumeError, NormativeAnomalyError
    from NormativeAnomalyLib.resources import demo_case, sample_data_dir

    from .files import FileAccess
    from .views import choose_render_window

    choose_render_window(args.render)  # before VTK renders anything
    allowed = [sample_data_dir(), *args.data_dir]
    initial = args.input
    if initial is not None:
        initial = initial.resolve()
        if not initial.is_file():
            raise InputVolumeError(f"--input {args.input}: no such file")
        allowed.append(initial.parent)  # the page may reopen it (and its neighbours)
    else:
        initial = demo_case().image
    if args.work_dir is not None:
        try:
            args.work_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise NormativeAnomalyError(f"--work-dir {args.work_dir} cannot be created: {error.strerror}") from None
    files = FileAccess(allowed, args.work_dir, int(args.max_upload_mb * 2**20))
    from .app import NormativeAnomalyApp

    app = NormativeAnomalyApp(files, device=args.device, initial_volume=str(initial))
    warning = exposure_warning(args.host)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    try:
        app.server.start(host=args.host, port=args.port, open_browser=False, show_connection_info=True)
    finally:
        app.session.close()
        files.close()
    return 0
