"""``normative-anomaly``: the command-line front end (run, demo, batch, models, serve).

Errors the user can fix, usage mistakes included, end with one line on stderr and exit
status 1; nothing the user had is overwritten unless ``--overwrite`` is given.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from dataclasses import fields
from pathlib import Path
from typing import Any, Callable, NoReturn, Sequence

from . import __version__
from .errors import Cancelled, NormativeAnomalyError, one_line
from .options import DIFFUSION_FLAGS, RunOptions, finite_number, flag_dest
from .run_folder import EXIT_CANCELLED, EXIT_ERROR, EXIT_INTERNAL, EXIT_OK, ERROR_PREFIX, MESSAGE_PREFIX


class _Parser(argparse.ArgumentParser):
    """Usage mistakes end as every other error does: one line on stderr, exit 1 (the usage
    itself is in --help)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_ERROR, f"{ERROR_PREFIX}{one_line(message)} (see {self.prog} --help)\n")


def positive_number(text: str) -> float:
    value = finite_number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def add_run_arguments(command: argparse.ArgumentParser, leave_out: Sequence[str] = ()) -> None:
    """An argument for each RunOptions field with a flag (except those named in ``leave_out``), in
    the fields' order, from the field's metadata: a new option needs no edit here."""
    exclusive: dict[str, Any] = {}
    for option in fields(RunOptions):
        meta = option.metadata
        if option.name in leave_out:
            continue
        if meta["parts"]:  # a dict option: one argument per key, in a group of their own
            group = command.add_argument_group(meta["help"])
            for part in meta["parts"].values():
                group.add_argument(part["flag"], type=part["parse"], choices=part["choices"], help=part["help"])
        elif meta["flag_when_false"]:  # yes, no or unset (None): one dest, two flags that exclude each other
            pair = command.add_mutually_exclusive_group()
            dest = flag_dest(meta["flag"])
            pair.add_argument(meta["flag"], dest=dest, action="store_const", const=True, help=meta["help"])
            pair.add_argument(meta["flag_when_false"], dest=dest, action="store_const", const=False,
                              help=meta["help_when_false"])
        elif meta["flag"]:
            target = command
            if meta["exclusive"]:  # two ways to say one thing
                if meta["exclusive"] not in exclusive:
                    exclusive[meta["exclusive"]] = command.add_mutually_exclusive_group()
                target = exclusive[meta["exclusive"]]
            if isinstance(option.default, bool):
                target.add_argument(meta["flag"], action="store_true", help=meta["help"])
            else:
                target.add_argument(meta["flag"], default=option.default, type=meta["parse"], choices=meta["choices"],
                                    help=meta["help"])


def _run_options(args: argparse.Namespace, **given: Any) -> RunOptions:
    """The pipeline's RunOptions from the arguments ``add_run_arguments`` added (a field left out
    keeps its default) and ``given``, the fields without a flag (brain_mask)."""
    parsed = vars(args)
    for option in fields(RunOptions):
        meta = option.metadata
        if meta["parts"]:
            given[option.name] = {key: parsed.get(flag_dest(part["flag"])) for key, part in meta["parts"].items()}
        elif meta["flag"] and flag_dest(meta["flag"]) in parsed:
            given[option.name] = parsed[flag_dest(meta["flag"])]
    return RunOptions(**given)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="normative-anomaly", description=(
        "Unsupervised anomaly detection in brain MRI: a normative model trained on healthy brains "
        "reconstructs a pseudo-healthy scan; the residual is the anomaly map. Research use only."))
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of internal errors")
    commands = parser.add_subparsers(dest="command", required=True)

    def add_run_options(command: argparse.ArgumentParser, one_case: bool = True, leave_out: Sequence[str] = ()) -> None:
        command.add_argument("--out", required=True, type=Path, help="output folder (must be new or empty)"
                             if one_case else "output folder: one folder per case and summary.csv; rerun to resume")
        command.add_argument("--model", help="a model's name (bundled or installed), or a package folder's path "
                             "(./folder, /path/to/folder); default: the default model")
        add_run_arguments(command, leave_out)
        if one_case:
            command.add_argument("--overwrite", action="store_true", help="replace outputs in a non-empty --out")
        command.add_argument("--json", action="store_true", help="print the run summary as JSON on stdout")
        command.add_argument("--quiet", action="store_true", help="no progress bars" if one_case else "no line per case")
        if one_case:
            command.add_argument("--progress-lines", action="store_true",
                                 help="machine-readable progress lines on stdout (for the Slicer and web front ends)")
            command.add_argument("--maps-only", action="store_true",
                                 help="write only run.json and the maps, what the Slicer and web front ends read back "
                                      "(they segment and tabulate live)")

    run = commands.add_parser("run", help="detect anomalies in one volume")
    run.add_argument("input", type=Path, help="volume file (NIfTI, NRRD, MHA...) or DICOM series folder")
    run.add_argument("--mask", type=Path, help="brain mask on the input's grid (default: the template's, mapped)")
    add_run_options(run)

    demo = commands.add_parser("demo", help="run on the bundled demo case with the default model")
    add_run_options(demo, leave_out=("registered",))  # the bundled demo case is not registered

    batch = commands.add_parser("batch", help="run a cohort (a folder or a list of volumes); resumable; "
                                "under torchrun the cases are shared between the workers")
    batch.add_argument("cases", type=Path, help="folder of volumes, or a list file: one path per line, or a CSV "
                       "with a 'path' column and optionally a 'case_id' column")
    add_run_options(batch, one_case=False)

    models = commands.add_parser("models", help="list the bundled model packages")
    models.add_argument("--json", action="store_true", help="machine-readable list")
    install = models.add_subparsers(dest="models_command").add_parser(
        "install", help="check a package archive (.zip, .tar, .tar.gz, .tgz) and install it for --model NAME")
    install.add_argument("archive", type=Path)
    install.add_argument("--models-dir", type=Path, help="install here (default: $NORMATIVE_ANOMALY_MODELS or "
                         "~/.local/share/normative-anomaly/models)")
    install.add_argument("--overwrite", action="store_true", help="replace an installed package of the same name")

    for register in front_end_commands():
        register(commands)
    return parser


# Entry-point group through which front ends (the web app's ``serve``) add their commands.
COMMANDS_GROUP = "normative_anomaly.commands"


def front_end_commands() -> list[Callable[[Any], None]]:
    """The installed front ends' command registrars; one whose requirements are missing is left out
    (Slicer's copy of the library has none)."""
    from importlib.metadata import entry_points

    found = entry_points()
    group = found.select(group=COMMANDS_GROUP) if hasattr(found, "select") else found.get(COMMANDS_GROUP, [])
    registrars = []
    for entry in group:
        try:
            registrars.append(entry.load())
        except ImportError:
            continue
    return registrars


class _Progress:
    """One tqdm bar per pipeline stage on stderr, or progress lines on stdout."""

    def __init__(self, enabled: bool, lines: bool = False) -> None:
        self.enabled, self.lines, self.stage, self.bar = enabled, lines, None, None

    def __call__(self, stage: str, fraction: float) -> None:
        if self.lines:
            from .run_folder import progress_line

            print(progress_line(stage, fraction), flush=True)
            return
        if not self.enabled or stage == "done":  # "done" is the pipeline's end, not a stage with a bar
            return
        from tqdm import tqdm

        if stage != self.stage:
            self.close()
            self.stage = stage
            self.bar = tqdm(total=100, desc=f"{stage:>12}", unit="%", leave=False, file=sys.stderr,
                            bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}")
        self.bar.update(round(100 * fraction) - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _run(args: argparse.Namespace, input_path: Path, extra: dict[str, Any]) -> dict[str, Any]:
    # Heavy imports only once the arguments are known to be good, so --help and errors are quick.
    from .run_folder import output_lock

    with output_lock(args.out):  # a second run into the same folder is refused, not raced
        return _run_locked(args, input_path, extra)


def _run_locked(args: argparse.Namespace, input_path: Path, extra: dict[str, Any]) -> dict[str, Any]:
    from .models import resolve_model
    from .outputs import write_outputs
    from .pipeline import detect_anomalies
    from .progress import Monitor
    from .run_folder import check_output_folder
    from .volume_io import read_mask, read_volume

    check_output_folder(args.out, args.overwrite)  # before any work: can it be written, may it be replaced
    package = resolve_model(args.model)
    _check_diffusion_options(args, package)
    image = read_volume(input_path)
    mask = read_mask(args.mask, image) if getattr(args, "mask", None) else None
    options = _run_options(args, brain_mask=mask)
    progress = _Progress(enabled=not (args.quiet or args.json), lines=args.progress_lines)
    try:
        monitor = Monitor(progress=progress, cancel=_cancel_requested.is_set, on_notice=_print_notice)
        result = detect_anomalies(image, package, options, monitor)
    finally:
        progress.close()
    progress("writing", 0.0)
    settings = _run_settings(args, package, options, input_path)
    if "truth" in extra:
        extra = {"demo_dice": _dice(result.segmentation.mask, extra.pop("truth"))} | extra
    summary = write_outputs(result, args.out, settings, overwrite=args.overwrite, extra_summary=extra,
                            cancel=_cancel_requested.is_set, maps_only=args.maps_only)
    progress("writing", 1.0)
    return summary


def _print_notice(message: str) -> None:
    """A fallback the user should know of (e.g. GPU out of memory, going on on the CPU): one line."""
    print(f"{MESSAGE_PREFIX}note: {message}", file=sys.stderr, flush=True)


def _check_diffusion_options(args: argparse.Namespace, package) -> None:
    asked = _run_options(args).diffusion or {}
    given = [DIFFUSION_FLAGS[key] for key, value in asked.items() if value is not None]
    if given and package.family != "ddpm":
        raise NormativeAnomalyError(f"{', '.join(given)}: only for diffusion models; '{package.name}' is a "
                                    f"{package.family} model")


def _run_settings(args: argparse.Namespace, package, options: RunOptions, input_path: Path | None) -> dict[str, Any]:
    """The settings recorded in run.json (batch compares them on resume)."""
    return options.settings(str(input_path) if input_path is not None else None, args.model or package.name,
                            str(args.mask) if getattr(args, "mask", None) else None)


def _batch(args: argparse.Namespace) -> int:
    """This worker's share of the cohort; worker 0 (the only one without torchrun) prints the summary."""
    from .batch import FAILED, OK, SKIPPED, read_cases, run_batch, start_worker, stop_worker
    from .models import resolve_model
    from .run_folder import standard_json

    cases = read_cases(args.cases, exclude=[args.out])
    worker = start_worker(args.device)
    try:
        package = resolve_model(args.model)  # once per worker, for every case
        _check_diffusion_options(args, package)
        notice = _print_notice if worker.rank == 0 else None  # once per batch, not once per worker
        asked = _run_options(args)
        options = _within_calibration(asked, package, notice)
        quiet = args.quiet or args.json
        result = run_batch(cases, args.out, package, options, _run_settings(args, package, asked, None), worker,
                           cancel=_cancel_requested.is_set, on_case=None if quiet else lambda line: print(line, flush=True),
                           reraise_internal=args.debug)
    finally:
        stop_worker(worker)
    if result.summary is None:  # not worker 0: worker 0 reports for all
        return EXIT_OK
    failed = result.count(FAILED)
    if args.json:
        print(standard_json({"summary": str(result.summary), "cases": result.rows}))
    else:
        print(f"{len(result.rows)} case(s) on {worker.world_size} worker(s) in {result.seconds:.1f} s: "
              f"{result.count(OK)} ok, {result.count(SKIPPED)} already finished, {failed} failed")
        print(f"summary in {result.summary}")
    # 0 once every case was tried, failed ones included (they are in the summary): a non-zero
    # exit would make torchrun treat the launch as failed, and restart it with --max-restarts.
    return EXIT_OK


def _within_calibration(options, package, notice: Callable[[str], None] | None):
    """The options with a threshold or rate the model's calibration covers, decided (and a
    note given) once for the whole batch rather than once per case."""
    from dataclasses import replace

    from .pipeline import resolve_threshold

    threshold, fpr = resolve_threshold(package, options, notice or (lambda message: None))
    if options.threshold is not None:
        return replace(options, threshold=threshold)
    return replace(options, fpr=fpr) if options.fpr is not None else options


def _dice(predicted, truth_path: Path) -> float | None:
    import numpy as np
    import SimpleITK as sitk

    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(truth_path))) > 0.5  # the bundled demo's label map
    total = predicted.sum() + truth.sum()
    return round(float(2 * np.logical_and(predicted, truth).sum() / total), 4) if total else None


def _models(args: argparse.Namespace) -> int:
    """The bundled packages, then those installed with ``models install`` (a broken one is listed
    with its error instead of stopping the listing)."""
    from .models import available_models, installed_model_names, resolve_model
    from .run_folder import standard_json
    from .resources import user_models_dir

    entries = [(entry["name"], entry["path"], entry["default"], entry["default_for_modality"], False)
               for entry in available_models()]
    entries += [(name, user_models_dir() / name, False, False, True) for name in installed_model_names()]
    rows = []
    for name, path, default, modality_default, installed in entries:
        try:  # by name, as --model NAME finds it: a folder holding another package is listed as unusable
            card = resolve_model(name).card
        except NormativeAnomalyError as error:
            rows.append({"name": name, "default": default, "installed": installed, "error": str(error),
                         "path": str(path)})
            continue
        rows.append({"name": card["name"], "default": default, "default_for_modality": modality_default,
                     "installed": installed, "family": card["family"],
                     "modality": card["modality"], "dims": card["dims"], "version": card["version"],
                     "template": card["template"]["name"], "description": card["description"],
                     "training_data": card["training"].get("data", ""), "license": card["license"],
                     "path": str(path)})
    if args.json:
        print(standard_json(rows))
    else:
        for row in rows:
            mark = " (default)" if row["default"] else " (installed)" if row["installed"] else ""
            if "error" in row:
                print(f"{row['name']}{mark}: unusable - {row['error']}")
            else:
                print(f"{row['name']}{mark}: {row['family']}, {row['modality']}, {row['dims']}D - {row['description']}")
    return EXIT_OK


def _install(args: argparse.Namespace) -> int:
    from .models.archive import install_package
    from .resources import user_models_dir

    folder = install_package(args.archive, args.models_dir or user_models_dir(), overwrite=args.overwrite)
    print(f"installed model '{folder.name}' in {folder}")
    return EXIT_OK


def _print_summary(summary: dict[str, Any], out: Path, as_json: bool) -> None:
    if as_json:
        from .run_folder import standard_json

        print(standard_json(summary))
        return
    print(f"model {summary['model']['name']} on {summary['device']}: {summary['lesion_count']} lesion(s), "
          f"{summary['lesion_volume_ml']:.2f} mL at threshold {summary['threshold']:.4g} "
          f"({100 * summary['threshold_healthy_fpr']:.3g}% healthy false-positive rate), "
          f"{summary['seconds']['total']:.1f} s")
    if summary.get("demo_dice") is not None:
        print(f"Dice with the demo case's simulated lesion: {summary['demo_dice']:.3f}")
    print(f"outputs in {out}/: {', '.join(summary['outputs'])}")


_cancel_requested = threading.Event()


def _request_cancel(signum, frame) -> None:
    """SIGTERM (a front end's Cancel) or Ctrl-C: stop at the next check point (between registration
    iterations, inference batches, stages), so that nothing half-written is left. A second signal
    stops at once."""
    if _cancel_requested.is_set():
        raise KeyboardInterrupt
    _cancel_requested.set()


def main(argv: Sequence[str] | None = None) -> int:
    _printable_stdout()
    args = _parser().parse_args(argv)
    if args.command == "serve":  # a server: Ctrl-C stops it (no run to cancel in this process)
        return _main(args)
    _cancel_requested.clear()
    in_main_thread = threading.current_thread() is threading.main_thread()
    signals = (signal.SIGTERM, signal.SIGINT)
    previous = [signal.signal(number, _request_cancel) for number in signals] if in_main_thread else []
    try:
        return _main(args)
    finally:
        for number, handler in zip(signals, previous):
            signal.signal(number, handler)


def _printable_stdout() -> None:
    """A path whose name is not UTF-8 (or not in the terminal's encoding) is printed escaped,
    as stderr does, rather than failing after the work is done."""
    reconfigure = getattr(sys.stdout, "reconfigure", None)
    if reconfigure is not None:
        reconfigure(errors="backslashreplace")


def _main(args: argparse.Namespace) -> int:
    try:
        if args.command == "models" and args.models_command == "install":
            return _install(args)
        if args.command == "models":
            return _models(args)
        if args.command == "batch":
            return _batch(args)
        if getattr(args, "run_command", None) is not None:  # a front end's command
            return args.run_command(args)
        if args.command == "demo":
            from .resources import demo_case

            demo = demo_case()
            summary = _run(args, demo.image, {"truth": demo.lesion_mask})
        else:
            summary = _run(args, args.input, {})
        _print_summary(summary, args.out, args.json)
        return EXIT_OK
    except Cancelled as error:
        print(f"{MESSAGE_PREFIX}{error}", file=sys.stderr)
        return EXIT_CANCELLED
    except NormativeAnomalyError as error:
        print(f"{ERROR_PREFIX}{error}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"{MESSAGE_PREFIX}interrupted; nothing was written", file=sys.stderr)
        return EXIT_CANCELLED
    except Exception as error:  # an internal bug: still one line, unless --debug
        if args.debug:
            raise
        print(f"{MESSAGE_PREFIX}internal error ({type(error).__name__}: {error}); rerun with --debug and "
              "report it", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
