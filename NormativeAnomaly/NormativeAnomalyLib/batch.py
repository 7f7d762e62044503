"""Batch inference over a cohort, sharded across ``torchrun`` workers, resumable.

``torchrun`` is the engine: it starts the processes (on one machine or many) and sets
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and ``LOCAL_WORLD_SIZE``; nothing here schedules.
Worker ``r`` of ``W`` takes cases ``r, r+W, ...`` of the same sorted list, loads the model
once, and writes each case with ``outputs.write_outputs`` into ``<out>/<case_id>/``. That
write is atomic (staging folder, then rename), so ``run.json`` present means a complete set:
a rerun skips those cases, and a killed run loses at most the cases in flight. A failing case
is recorded with its one-line error and the worker goes on, whatever the failure. Worker 0
holds ``<out>``'s lock (``run_folder.output_lock``) for the whole batch, so the workers of one
batch share the folder and a second batch (or a run) into it is refused. Each worker appends one JSON line
per case to ``<out>/.batch/rank-<r>.jsonl``; when every worker is done (a gloo barrier),
worker 0 merges this run's lines into ``<out>/summary.csv``. Without torchrun the same code
runs as one plain process.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import tempfile
import time
import uuid
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from .errors import Cancelled, NormativeAnomalyError, OutputError, one_line
from .options import RESULT_SETTINGS
from .run_folder import (MAX_NAME_BYTES, RUN_JSON, RunSummary, check_output_folder, file_mode, output_folder,
                         output_lock, read_run_summary, staging_folders, standard_json, unwritable)

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
SUMMARY_FILE, LOG_FOLDER = "summary.csv", ".batch"
SUMMARY_COLUMNS = ("case_id", "input", "status", "lesion_count", "lesion_volume_ml", "threshold", "seconds", "error")
OK, FAILED, SKIPPED = "ok", "failed", "skipped-finished"
# Settings that change a case's result: a rerun into the same --out must use the same ones,
# otherwise finished and new cases would silently disagree.
# The barrier waits for the slowest worker's whole shard (hours on a big cohort), not the
# default 30 minutes.
BARRIER_TIMEOUT = timedelta(days=7)
_CASE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass(frozen=True)
class Case:
    case_id: str  # the output folder's name: stable across reruns of the same list
    input: Path


@dataclass(frozen=True)
class Worker:
    """Where this process sits in a torchrun launch (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


@dataclass
class BatchResult:
    """What worker 0 reports once every worker is done (other workers get ``summary=None``)."""

    rows: list[dict[str, Any]]
    summary: Path | None
    seconds: float

    def count(self, status: str) -> int:
        return sum(row["status"] == status for row in self.rows)


# --- The case list ------------------------------------------------------------------------

def read_cases(source: str | os.PathLike, exclude: Iterable[Path] = ()) -> list[Case]:
    """Cases from a folder of volumes (sorted by name) or a list file (in its order).

    A folder gives its volume files and its sub-folders holding a DICOM series; ``exclude``
    keeps the output folder out when it lies inside. A list file has one path per line, or is
    a CSV whose header names a ``path`` (or ``input``) column and optionally a ``case_id``
    (or ``id``) column; relative paths are relative to the list file. Blank and ``#`` lines
    are ignored. A missing file is not an error here: that case fails alone when it runs."""
    source = Path(source)
    if source.is_dir():
        entries = _folder_entries(source, {p.resolve() for p in exclude})
    elif source.is_file():
        if source.name.lower().endswith(VOLUME_SUFFIXES):
            raise NormativeAnomalyError(f"{source} is a volume; give a folder of volumes or a list file "
                                        "(or use normative-anomaly run for one volume)")
        entries = _list_entries(source)
    else:
        raise NormativeAnomalyError(f"case list not found: {source}")
    if not entries:
        raise NormativeAnomalyError(f"no cases in {source}: it lists no volume files")
    return _with_case_ids(entries, source)


def _folder_entries(folder: Path, exclude: set[Path]) -> list[tuple[Path, str | None]]:
    from .dicom_series import has_dicom_series

    entries = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or path.resolve() in exclude:
            continue
        if path.is_file() and path.name.lower().endswith(VOLUME_SUFFIXES):
            entries.append((path.resolve(), None))
        elif path.is_dir() and has_dicom_series(path):
            entries.append((path.resolve(), None))
    return entries


def _list_entries(list_file: Path) -> list[tuple[Path, str | None]]:
    try:
        lines = list_file.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise NormativeAnomalyError(f"case list {list_file} cannot be read: {error}") from None
    lines = [line for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not lines:
        return []
    header = [cell.strip().lower() for cell in next(csv.reader([lines[0]]))]
    path_column = next((header.index(name) for name in ("path", "input") if name in header), None)
    base = list_file.resolve().parent
    if path_column is None:  # a plain list: the whole line is the path
        return [(base / line.strip(), None) for line in lines]
    id_column = next((header.index(name) for name in ("case_id", "id") if name in header), None)
    entries = []
    for number, row in enumerate(csv.reader(lines[1:]), start=2):
        if len(row) <= path_column or not row[path_column].strip():
            raise NormativeAnomalyError(f"case list {list_file}, row {number}: no path")
        case_id = row[id_column].strip() if id_column is not None and len(row) > id_column else ""
        entries.append((base / row[path_column].strip(), case_id or None))
    return entries


def _stem(path: Path) -> str:
    """The file name without its volume suffix, in characters safe for a folder name."""
    name = path.name
    for suffix in VOLUME_SUFFIXES:
        if name.lower().endswith(suffix):
            name = name[:-len(suffix)]
            break
    return re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip("._-") or "case"


def _with_case_ids(entries: list[tuple[Path, str | None]], source: Path) -> list[Case]:
    """Given ids as they are (checked), others from the file stem, made unique in list order
    (``t1``, ``t1-2``, ...), so the same list always gives the same ids. Unique regardless of
    case (macOS and Windows folders), and never the summary's name."""
    taken = {SUMMARY_FILE}
    for _, given in entries:
        if given is None:
            continue
        if not _CASE_ID.fullmatch(given):
            raise NormativeAnomalyError(f"case id {given!r} in {source}: use letters, digits, '.', '_' or '-', "
                                        "starting with a letter or digit")
        if len(given) > MAX_NAME_BYTES:  # the case's folder name
            raise NormativeAnomalyError(f"case id {given[:20]!r}... in {source} has {len(given)} characters; "
                                        f"at most {MAX_NAME_BYTES}")
        if given.lower() in taken:
            raise NormativeAnomalyError(f"case id {given!r} appears twice in {source}, or is reserved")
        taken.add(given.lower())
    cases = []
    for path, given in entries:
        case_id = given
        if case_id is None:
            stem, suffix = _stem(path), 1
            case_id = stem
            while case_id.lower() in taken:
                suffix += 1
                case_id = f"{stem}-{suffix}"
            taken.add(case_id.lower())
        cases.append(Case(case_id, path))
    return cases


def shard(cases: list[Case], worker: Worker) -> list[Case]:
    """Worker r of W takes cases r, r+W, ...: every case exactly once, shards within one of
    each other in size, and no coordination needed beyond the shared, ordered list."""
    return cases[worker.rank::worker.world_size]


# --- The worker ---------------------------------------------------------------------------

def worker_from_env() -> Worker:
    """This process's place in a torchrun launch, from the variables torchrun sets."""
    env = os.environ
    world = int(env.get("WORLD_SIZE", "1"))
    return Worker(rank=int(env.get("RANK", "0")), world_size=world, local_rank=int(env.get("LOCAL_RANK", "0")),
                  local_world_size=int(env.get("LOCAL_WORLD_SIZE", str(world))))


def start_worker(device: str = "auto") -> Worker:
    """Join torchrun's process group (gloo: only a barrier and one small broadcast travel over
    it, so it works the same with or without GPUs), pin this worker's GPU, and share the CPU
    cores between the workers of a machine (registration runs on the CPU even with a GPU)."""
    import torch

    worker = worker_from_env()
    if worker.distributed:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo", timeout=BARRIER_TIMEOUT)
    if device in ("auto", "cuda") and torch.cuda.is_available():
        torch.cuda.set_device(worker.local_rank % torch.cuda.device_count())  # "cuda" is now this GPU
    if "LOCAL_WORLD_SIZE" in os.environ:  # under torchrun: don't let N workers each take every core
        import SimpleITK as sitk

        threads = max(1, _available_cpus() // max(worker.local_world_size, 1))
        torch.set_num_threads(threads)
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    return worker


def stop_worker(worker: Worker) -> None:
    if worker.distributed:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def _available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def _run_id(worker: Worker) -> str:
    """One id shared by every worker of this launch: it tells this run's log lines from those
    of earlier runs (the logs are appended to, across runs and world sizes)."""
    return _from_worker_0(worker, time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:8])


def _from_worker_0(worker: Worker, value: Any) -> Any:
    """Worker 0's ``value``, on every worker."""
    if not worker.distributed:
        return value
    import torch.distributed as dist

    shared = [value]
    dist.broadcast_object_list(shared, src=0)
    return shared[0]


@contextmanager
def _batch_lock(out: Path, worker: Worker) -> Iterator[None]:
    """Worker 0 holds ``out``'s lock for the whole batch; every worker learns whether it got it,
    so the workers of a second batch stop at once too."""
    with ExitStack() as held:
        refusal = None
        if worker.rank == 0:
            try:
                held.enter_context(output_lock(out))
            except NormativeAnomalyError as error:
                refusal = str(error)
        refusal = _from_worker_0(worker, refusal)
        if refusal is not None:
            raise OutputError(refusal)
        yield


def _wait_for_all(worker: Worker, cancel: Callable[[], bool]) -> None:
    """The barrier before the summary, polled so that a Cancel still stops a waiting worker."""
    if not worker.distributed:
        return
    import torch.distributed as dist

    work = dist.barrier(async_op=True)
    while not work.is_completed():
        if cancel():
            raise Cancelled("cancelled while waiting for the other workers; finished cases are kept, "
                            "rerun the same command to resume")
        time.sleep(0.2)
    work.wait()


# --- One case -----------------------------------------------------------------------------


def _finished_record(case: Case, case_out: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """A finished case: skipped, with its figures from run.json; or failed when that run was
    of another input or with other settings (its outputs are left as they are)."""
    previous = read_run_summary(case_out)
    if previous.input != str(case.input):
        return {"status": FAILED, "error": f"{case_out} holds the outputs of another input "
                                           f"({previous.input}); give this case another id or --out"}
    earlier = previous.settings
    changed = [f"{key} {earlier.get(key)!r} -> {settings.get(key)!r}" for key in RESULT_SETTINGS
               if earlier.get(key) != settings.get(key)]
    if changed:
        return {"status": FAILED, "error": f"{case_out} was finished with other settings "
                                           f"({', '.join(changed)}); use another --out"}
    return {"status": SKIPPED} | _figures(previous)


def _figures(summary: RunSummary) -> dict[str, Any]:
    """The summary's figures of a finished case, from its run.json (so a resumed summary shows
    the same figures as the run that made them)."""
    return {"lesion_count": summary.lesion_count, "lesion_volume_ml": summary.lesion_volume_ml,
            "threshold": summary.threshold}


def _case_record(case: Case, out: Path, package, options, settings: dict[str, Any], cancel: Callable[[], bool],
                 reraise_internal: bool) -> dict[str, Any]:
    """One case's record: finished before, run now, or failed with a one-line reason; only a
    Cancel stops the batch (one odd scan or folder must not stop a cohort)."""
    try:
        if (out / case.case_id / RUN_JSON).is_file():
            return _finished_record(case, out / case.case_id, settings)
        return _run_case(case, out, package, options, settings, cancel)
    except Cancelled:
        raise
    except NormativeAnomalyError as error:
        return {"status": FAILED, "error": one_line(error)}
    except Exception as error:
        if reraise_internal:
            raise
        return {"status": FAILED, "error": f"internal error ({type(error).__name__}: {one_line(error)})"}


def _run_case(case: Case, out: Path, package, options, settings: dict[str, Any],
              cancel: Callable[[], bool]) -> dict[str, Any]:
    """Run and write one case, its folder locked and checked before the work."""
    from .outputs import write_outputs
    from .pipeline import detect_anomalies
    from .progress import Monitor
    from .volume_io import read_volume

    case_out = out / case.case_id
    with output_lock(case_out):  # a run into this case's folder meanwhile is refused
        for stale in staging_folders(case_out):  # from a killed run
            shutil.rmtree(stale, ignore_errors=True)
        if case_out.exists() and (not case_out.is_dir() or any(case_out.iterdir())):
            return {"status": FAILED, "error": f"{case_out} holds other files and no run.json; move them away"}
        check_output_folder(case_out, overwrite=False)
        result = detect_anomalies(read_volume(case.input), package, options, Monitor(cancel=cancel))
        summary = write_outputs(result, case_out, settings | {"input": str(case.input)},
                                extra_summary={"batch_case_id": case.case_id}, cancel=cancel)
    return {"status": OK} | _figures(RunSummary.from_json(summary))


# --- The logs and the summary -------------------------------------------------------------

def _append_line(path: Path, record: dict[str, Any]) -> None:
    """One whole line per write on an O_APPEND file, synced: a killed worker leaves whole lines."""
    data = (standard_json(record, indent=None) + "\n").encode()
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            os.write(descriptor, data)
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
    except OSError as error:
        raise OutputError(f"cannot write the batch log {path}: {error.strerror or one_line(error)}") from None


def read_log_records(out: Path) -> list[dict[str, Any]]:
    """Every record of every worker's log, of every run (a torn last line is skipped)."""
    records = []
    for log in sorted((out / LOG_FOLDER).glob("rank-*.jsonl")):
        for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
    return records


def merge_summary(out: Path, cases: list[Case], run_id: str) -> list[dict[str, Any]]:
    """One row per case, sorted by case id, from this run's records of every worker; a case
    without one (its worker's log lost the line) is taken from its run.json if finished."""
    records = {r["case_id"]: r for r in read_log_records(out) if r.get("run") == run_id}
    rows = []
    for case in sorted(cases, key=lambda c: c.case_id):
        record = records.get(case.case_id) or _record_from_outputs(out / case.case_id)
        rows.append({column: record.get(column) for column in SUMMARY_COLUMNS}
                    | {"case_id": case.case_id, "input": str(case.input)})
    return rows


def _record_from_outputs(case_out: Path) -> dict[str, Any]:
    try:
        return {"status": SKIPPED} | _figures(read_run_summary(case_out))
    except OutputError:
        return {"status": FAILED, "error": f"no record of this case in {case_out.parent / LOG_FOLDER}"}


def write_summary(path: Path, rows: list[dict[str, Any]]) -> None:
    """summary.csv, replaced whole (temporary file, then os.replace). A path that is not UTF-8
    is written escaped (\\udcff), so the file stays UTF-8."""
    temporary = None
    try:
        handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        with os.fdopen(handle, "w", newline="", encoding="utf-8", errors="backslashreplace") as stream:
            writer = csv.DictWriter(stream, fieldnames=SUMMARY_COLUMNS)
            writer.writeheader()
            writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in rows)
        os.chmod(temporary, file_mode())
        os.replace(temporary, path)
    except BaseException as error:
        if temporary is not None:
            Path(temporary).unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise OutputError(f"cannot write {path}: {error.strerror or one_line(error)}") from None
        raise


def case_line(record: dict[str, Any], position: int, total: int, worker: Worker) -> str:
    """The one progress line printed per case."""
    where = f"[{position}/{total}" + (f" rank {worker.rank}]" if worker.distributed else "]")
    head = f"{where} {record['case_id']}: {record['status']}"
    if record["status"] == FAILED:
        return f"{head}: {record['error']}"
    return f"{head}, {record['lesion_count']} lesion(s), {record['lesion_volume_ml']:.2f} mL, {record['seconds']:.1f} s"


# --- The batch ----------------------------------------------------------------------------

def run_batch(cases: list[Case], out: str | os.PathLike, package, options, settings: dict[str, Any],
              worker: Worker | None = None, cancel: Callable[[], bool] = lambda: False,
              on_case: Callable[[str], None] | None = None, reraise_internal: bool = False) -> BatchResult:
    """This worker's shard of ``cases`` with one loaded ``package``; on worker 0, after every
    worker is done, the merged summary. ``options`` is a ``pipeline.RunOptions`` used for every
    case; ``settings`` go into each run.json (the case's input is added)."""
    worker = worker or Worker()
    out = output_folder(out)
    with _batch_lock(out, worker):
        return _run_shard(cases, out, package, options, settings, worker, cancel, on_case, reraise_internal)


def _run_shard(cases: list[Case], out: Path, package, options, settings: dict[str, Any], worker: Worker,
               cancel: Callable[[], bool], on_case: Callable[[str], None] | None,
               reraise_internal: bool) -> BatchResult:
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out} exists and is not a folder")
    try:
        (out / LOG_FOLDER).mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise unwritable(out, error) from None
    log = out / LOG_FOLDER / f"rank-{worker.rank}.jsonl"
    run_id, began = _run_id(worker), time.perf_counter()
    mine = shard(cases, worker)
    for position, case in enumerate(mine, start=1):
        if cancel():
            raise _cancelled(position - 1)
        start = time.perf_counter()
        try:
            record = _case_record(case, out, package, options, settings, cancel, reraise_internal)
        except (Cancelled, KeyboardInterrupt):
            raise _cancelled(position - 1) from None
        # seconds: what this run spent on the case (reading, the pipeline, writing; ~0 when skipped)
        record = {"run": run_id, "rank": worker.rank, "case_id": case.case_id, "input": str(case.input)} | record \
            | {"seconds": round(time.perf_counter() - start, 3)}
        _append_line(log, record)
        if on_case is not None:
            on_case(case_line(record, position, len(mine), worker))
    _wait_for_all(worker, cancel)
    if worker.rank != 0:
        return BatchResult([], None, time.perf_counter() - began)
    rows = merge_summary(out, cases, run_id)
    write_summary(out / SUMMARY_FILE, rows)
    return BatchResult(rows, out / SUMMARY_FILE, time.perf_counter() - began)


def _cancelled(done: int) -> Cancelled:
    return Cancelled(f"cancelled after {done} case(s) of this worker; finished cases are kept, "
                     "rerun the same command to resume")
