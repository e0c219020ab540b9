"""Run every (condition, seed) of a study in parallel worker processes, resumably, and store tidy rows.

Each run is ``lightning-moe fit --config <base> --<override>=<value> ...`` (:func:`lightning_moe.cli.main`) in a
fresh process of its own, forked from a server that has imported lightning once: a crash stays inside its run,
every run has a log file starting with the equivalent command line, and the LightningCLI sees exactly what a
person would type. The runner adds the run's output folder, ``torch_threads`` and a
:class:`~lightning_moe.studies.capture.StudyMetrics` callback that writes the final logged metrics. Before any
training, each condition's command line is parsed once with ``--print_config``, so a mistyped key is named in
seconds. The main process alone appends rows, so the rows file has a single writer.

Output folder (default ``runs/studies/<study name>/``; ``--smoke`` runs live in its ``smoke/`` subfolder so they never
mix with full runs):

* ``runs.jsonl``: one JSON row per finished, failed or rejected run, appended as runs end (append-only: a rerun adds
  a newer row). Load with ``pandas.json_normalize`` for a flat table.
* ``logs/<run id>.log``: the command and everything the run printed.
* ``runs/<run id>/``: the trainer's ``default_root_dir`` (checkpoints, logger files, ``result.json``).
* ``configs/<condition>.yaml``: the fully resolved config of each condition (first seed), from ``--print_config``.

Records (``<study folder>/records/``, committed beside the report): after a default full run, the rows file and every
run's small JSON artefacts (what the report sections read; not checkpoints, logs or ``result.json``, whose numbers
are in the rows) are copied there, and the study folder's report is built from them, so ``lightning-moe study
report`` rebuilds the committed report without training.

Resuming: a run with a ``status: ok`` row of the same fingerprint (config files' contents and overrides) is never
redone; everything else (never started, killed, failed, rejected, or changed since) runs again.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import json
import multiprocessing
import multiprocessing.connection
import os
import platform
import re
import shlex
import signal
import sys
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning_moe.studies.spec import RunPlan, Study, StudyError, override_args, plan_runs

ROWS_FILE = "runs.jsonl"
DEFAULT_OUT = Path("runs") / "studies"
RECORDS_DIR = "records"
RESULT_FILE = "result.json"


@dataclass(frozen=True)
class StudyPaths:
    """Where a study's runs, logs and rows live; ``root`` is the output folder (its ``smoke/`` for smoke runs),
    ``report_dir`` where ``REPORT.md`` and its plots go."""

    root: Path
    report_dir: Path
    records: bool = False  # root is a study's shipped records (rows and artefacts only, no logs)

    @classmethod
    def of(cls, study: Study, out: str | Path | None = None, smoke: bool = False) -> StudyPaths:
        """The default output folder is ``runs/studies/<study name>``; smoke runs use its ``smoke/``. Only the
        default full runs write the study folder's own ``REPORT.md``: a smoke run or one into an explicit ``out``
        (a subset, a trial) reports next to its runs, so it never overwrites the committed report."""
        root = Path(out) if out is not None else DEFAULT_OUT / study.name
        root = root / "smoke" if smoke else root
        return cls(root, root if smoke or out is not None else study.dir)

    @classmethod
    def of_records(cls, study: Study) -> StudyPaths:
        """The study's shipped records (``<study folder>/records``), reported into the study folder."""
        return cls(study.dir / RECORDS_DIR, study.dir, records=True)

    @property
    def rows(self) -> Path:
        """The rows file."""
        return self.root / ROWS_FILE

    def log(self, name: str) -> Path:
        """A run's (or a condition validation's) log file."""
        return self.root / "logs" / f"{name}.log"

    def run_dir(self, run_id: str) -> Path:
        """A run's ``trainer.default_root_dir``."""
        return self.root / "runs" / run_id

    def config(self, condition: str) -> Path:
        """The resolved config of a condition, from ``--print_config``."""
        return self.root / "configs" / f"{condition}.yaml"

    def rel(self, path: Path) -> str:
        """Rows store paths relative to the output folder, so the folder can move."""
        return path.relative_to(self.root).as_posix()


@dataclass
class RunSummary:
    """What one ``study run`` did, by run id."""

    planned: int
    skipped: list[str] = field(default_factory=list)
    executed: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    invalid: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """No run failed and no condition was rejected."""
        return not (self.failed or self.invalid)


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity where the OS has one, e.g. inside a container)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_workers(threads: int = 1) -> int:
    """One worker per usable core (``threads`` torch threads each), at least one."""
    return max(1, usable_cores() // max(1, threads))


def hardware() -> dict[str, Any]:
    """The machine the runs execute on, for the report: CPU model, cores, accelerator and library versions."""
    import lightning
    import torch

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info: dict[str, Any] = {
        "cpu": cpu, "cores": os.cpu_count(), "usable_cores": usable_cores(),
        "system": f"{platform.system()} {platform.machine()}", "python": platform.python_version(),
        "torch": torch.__version__, "lightning": lightning.__version__,
    }
    if torch.cuda.is_available():
        info["accelerator"] = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    return info


def export_records(study: Study, paths: StudyPaths) -> StudyPaths:
    """Copy the rows file, the resolved config of each condition and each run's JSON artefacts from ``paths``
    into the study's records, replacing the previous records; return the records' paths."""
    import shutil

    records = StudyPaths.of_records(study)
    shutil.rmtree(records.root, ignore_errors=True)
    records.root.mkdir(parents=True)
    shutil.copyfile(paths.rows, records.rows)
    for config in sorted((paths.root / "configs").glob("*.yaml")):
        # The run folders are this machine's absolute paths: records name them by their role instead.
        (records.root / "configs").mkdir(exist_ok=True)
        text = config.read_text().replace(str(paths.root.resolve()), "<output folder>")
        (records.root / "configs" / config.name).write_text(text)
    for run in sorted((paths.root / "runs").glob("*")):
        for artefact in sorted(run.glob("*.json")):
            if artefact.name != RESULT_FILE:
                records.run_dir(run.name).mkdir(parents=True, exist_ok=True)
                shutil.copyfile(artefact, records.run_dir(run.name) / artefact.name)
    return records


def read_rows(path: Path) -> list[dict[str, Any]]:
    """All rows of a rows file, oldest first; a half-written last line (the writer was killed) is skipped."""
    if not path.is_file():
        return []
    rows = []
    for i, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            print(f"warning: {path.name} line {i + 1} is not valid JSON (an interrupted write?); skipped.",
                  file=sys.stderr)
    return rows


def append_row(path: Path, row: dict[str, Any]) -> None:
    """Append one row and flush it to disk, so a kill right after loses nothing that finished."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # A writer killed mid-line leaves no newline; start a fresh line so this row is not glued to the fragment.
    torn = False
    if path.is_file() and path.stat().st_size:
        with path.open("rb") as f:
            f.seek(-1, os.SEEK_END)
            torn = f.read(1) != b"\n"
    with path.open("a") as f:
        f.write(("\n" if torn else "") + json.dumps(row, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _runner_overrides(plan: RunPlan, paths: StudyPaths, threads: int) -> dict[str, Any]:
    """What the runner adds to every run, after the study's overrides: these must win."""
    callback = {
        "class_path": "lightning_moe.studies.capture.StudyMetrics",
        "init_args": {"path": str((paths.run_dir(plan.run_id) / RESULT_FILE).resolve())},
    }
    return {
        "trainer.default_root_dir": str(paths.run_dir(plan.run_id).resolve()),
        # A per-run progress bar would only fill the log file; the study shows one bar over runs.
        "trainer.enable_progress_bar": False,
        "torch_threads": threads,
        "trainer.callbacks+": callback,
    }


def _command(plan: RunPlan, paths: StudyPaths, threads: int) -> list[str]:
    """The run's full ``lightning-moe`` argument list."""
    return plan.cli_args() + override_args(_runner_overrides(plan, paths, threads))


def _parser_error(stderr: str) -> str:
    """The part of a jsonargparse failure after its usage text."""
    idx = stderr.find("error:")
    return " ".join((stderr[idx:] if idx >= 0 else stderr).split()) or "the parser rejected the arguments"


def _offending_key(plan: RunPlan, message: str) -> str | None:
    """The override the parser complained about, when its message names it (by full flag or last key part)."""
    for key in plan.overrides:
        last = key.rsplit(".", 1)[-1]
        if f"--{key}=" in message or f"'{last}'" in message or f'"{last}"' in message:
            return key
    return None


def validate_condition(plan: RunPlan, paths: StudyPaths, threads: int, study: Study) -> str | None:
    """Parse the run's full command line with ``--print_config`` (nothing is built or trained). On success save the
    resolved config to ``configs/<condition>.yaml`` and return None; otherwise return an error naming the condition,
    the rejected key and value, the parser's reason and the fix, and write the parser output to a log."""
    from lightning_moe.cli import main  # imports lightning; only the runner process needs it

    out, err = io.StringIO(), io.StringIO()
    code: int | str | None = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
            # LightningCLI warns when sys.argv has arguments besides `args`; here they are the study command's own.
            warnings.filterwarnings("ignore", message=".*args parameter is intended to run from within Python.*")
            main(_command(plan, paths, threads) + ["--print_config"])
    except SystemExit as exit_:
        code = exit_.code
    except Exception as exc:  # a config file that fails to load raises instead of exiting
        code, err = 1, io.StringIO(f"error: {type(exc).__name__}: {exc}")
    if code in (0, None):
        paths.config(plan.condition).parent.mkdir(parents=True, exist_ok=True)
        paths.config(plan.condition).write_text(out.getvalue())
        return None
    log = paths.log(f"{plan.condition}.validate")
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("$ lightning-moe " + shlex.join(plan.cli_args() + ["--print_config"]) + "\n\n" + err.getvalue())
    reason = _parser_error(err.getvalue())
    key = _offending_key(plan, reason)
    what = f"override {key}={plan.overrides[key]!r}" if key else f"overrides {plan.overrides}"
    return (
        f"condition {plan.condition!r}: {what} was rejected by the config parser ({reason}). Fix the key or value "
        f"in {study.path.name} (overrides, conditions or smoke); `lightning-moe fit --config <base> --print_config` "
        f"lists the valid keys. Parser output: {paths.rel(log)}"
    )


def validate_plans(study: Study, plans: Sequence[RunPlan], paths: StudyPaths, threads: int) -> dict[str, str]:
    """Validate each condition of ``plans`` once (at its first seed), before any training, so a typo costs seconds,
    not a study. Returns condition -> error for the rejected ones, each also printed."""
    first: dict[str, RunPlan] = {}
    for p in plans:
        first.setdefault(p.condition, p)
    rejected = {}
    for cond, p in first.items():
        error = validate_condition(p, paths, threads, study)
        if error:
            rejected[cond] = error
            print(f"error: {error}", file=sys.stderr)
    return rejected


_ERROR_LINE = re.compile(r"^([A-Za-z_][\w.]*(Error|Exception|Interrupt)\b.*|error:.*)$")


def _crash_reason(log: Path, returncode: int) -> str:
    """The last exception of a run's log with the lines under it (jsonargparse puts the cause of a failed class
    instantiation there), else the log's last line, with the exit status."""
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    starts = [i for i, ln in enumerate(lines) if _ERROR_LINE.match(ln)]
    text = " ".join(lines[starts[-1]:starts[-1] + 8]) if starts else (lines[-1] if lines else "no output")
    # multiprocessing reports death by a signal as a negative exit code (-9: killed, e.g. out of memory).
    status = f"killed by signal {-returncode}" if returncode < 0 else f"exit status {returncode}"
    return f"{status}: {text[:600]}"


def _now() -> str:
    """UTC time stamp for rows."""
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _row_head(plan: RunPlan, study: Study, paths: StudyPaths) -> dict[str, Any]:
    """The columns every row of a run has, whatever became of it: what it is and the config it ran with (the
    config files relative to the study file, the overrides in order, the resolved config in the output folder)."""
    return {
        "run_id": plan.run_id, "condition": plan.condition, "seed": plan.seed, "fingerprint": plan.fingerprint,
        "configs": [Path(os.path.relpath(c, study.dir)).as_posix() for c in plan.configs],
        "overrides": plan.overrides, "config": paths.rel(paths.config(plan.condition)),
    }


def _process_context() -> multiprocessing.context.BaseContext:
    """Fresh processes forked from a server that has already imported lightning (``forkserver``): a run starts in a
    fraction of a second instead of the ~8 s an interpreter takes to import lightning, yet every run is its own
    process, so crashes and global state (threads, seeds, deterministic flags) stay inside it. The server is a
    new single-threaded interpreter, so forking it is safe even though this process has threads. ``spawn`` where
    ``forkserver`` does not exist (Windows): slower, same behaviour."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    # Only our CLI: the default also preloads __main__, which is not ours to import.
    ctx.set_forkserver_preload(["lightning_moe.cli"])
    return ctx


LOCK_FILE = ".lock"


@contextlib.contextmanager
def study_lock(paths: StudyPaths) -> Iterator[None]:
    """Hold ``<out>/.lock`` (the runner's pid) while a study runs: a second runner on the same output folder would
    train the same run folders twice, concurrently. A lock whose process is gone (a killed runner) is taken over."""
    paths.root.mkdir(parents=True, exist_ok=True)
    lock = paths.root / LOCK_FILE
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            try:
                pid = int(lock.read_text().strip() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid and _alive(pid):
                raise StudyError(
                    f"another `lightning-moe study run` (pid {pid}) is using {paths.root}; wait for it to finish or "
                    f"stop it (kill {pid}), or pass a different --out."
                ) from None
            print(f"taking over the stale lock of a runner that is gone (pid {pid}) in {paths.root}", file=sys.stderr)
            lock.unlink(missing_ok=True)
    with os.fdopen(fd, "w") as f:
        f.write(str(os.getpid()))
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _exit_when_orphaned(parent: int) -> None:
    """A run dies with its study: when the process that started it is gone (the runner killed, even by SIGKILL,
    takes its fork server with it), the run is reparented and stops here instead of training on unwatched."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="lightning-moe-orphan-watch").start()


def _child(args: list[str], log: str) -> None:
    """Body of a run's process: everything it prints goes to its log, then ``lightning-moe <args>`` runs."""
    _exit_when_orphaned(os.getppid())
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    from lightning_moe.cli import main

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*args parameter is intended to run from within Python.*")
        main(args)
    sys.stdout.flush()
    sys.stderr.flush()


@dataclass
class _Running:
    """A started run: its plan, its process and when it started."""

    plan: RunPlan
    process: multiprocessing.process.BaseProcess
    started: str
    t0: float


def _start(ctx: multiprocessing.context.BaseContext, plan: RunPlan, paths: StudyPaths, threads: int) -> _Running:
    """Start a run's process; its log begins with the command line."""
    run_dir = paths.run_dir(plan.run_id)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / RESULT_FILE).unlink(missing_ok=True)  # from an attempt whose row was lost: never reuse it
    log = paths.log(plan.run_id)
    log.parent.mkdir(parents=True, exist_ok=True)
    args = _command(plan, paths, threads)
    # The equivalent command line first, so a run can be repeated by hand from its log.
    log.write_text("$ lightning-moe " + shlex.join(args) + "\n\n")
    process = ctx.Process(target=_child, args=(args, str(log)), name=plan.run_id)
    started, t0 = _now(), time.perf_counter()
    process.start()
    return _Running(plan, process, started, t0)


def _finish(job: _Running, study: Study, paths: StudyPaths, base: dict[str, Any]) -> dict[str, Any]:
    """The row of a run whose process has ended."""
    job.process.join()
    code = job.process.exitcode
    plan, log, run_dir = job.plan, paths.log(job.plan.run_id), paths.run_dir(job.plan.run_id)
    result = run_dir / RESULT_FILE
    row = base | _row_head(plan, study, paths) | {
        "started": job.started, "finished": _now(), "wall_s": time.perf_counter() - job.t0,
        "returncode": code, "log": paths.rel(log), "run_dir": paths.rel(run_dir), "metrics": {}, "error": None,
    }
    if code == 0 and result.is_file():
        data = json.loads(result.read_text())
        row.update(status="ok", metrics=data["metrics"], global_step=data["global_step"], fit_s=data["fit_s"])
    elif code == 0:
        row.update(status="failed", error="exit status 0 but no metrics were written: did fit run to its end?")
    else:
        row.update(status="failed", error=_crash_reason(log, code))
    return row


def _stop(jobs: Sequence[_Running]) -> None:
    """Terminate running runs (Ctrl-C, ``kill``); kill those that do not stop within 10 s."""
    for job in jobs:
        job.process.terminate()
    for job in jobs:
        job.process.join(timeout=10)
        if job.process.is_alive():
            job.process.kill()
            job.process.join()


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Let ``kill <pid>`` stop a study like Ctrl-C does: children are stopped and finished rows are kept."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_study(
    study: Study, *, smoke: bool = False, workers: int | None = None, threads: int = 1,
    seeds: Sequence[int] | None = None, conditions: Sequence[str] | None = None, out: str | Path | None = None,
    progress: bool = True,
) -> RunSummary:
    """Run what is not finished yet, holding the output folder's lock; see the module docstring for the files
    written.

    Args:
        study: the parsed study file.
        smoke: apply the study's ``smoke`` block and keep the runs under ``<out>/smoke/``.
        workers: parallel runs (default: one per usable core / ``threads``).
        threads: torch threads per run.
        seeds: replace the study's seeds.
        conditions: run only these conditions.
        out: output folder (default ``runs/studies/<study name>``).
        progress: show a progress bar over runs.
    """
    from tqdm.auto import tqdm  # installed with lightning

    if threads < 1:
        raise StudyError(f"--threads must be >= 1, got {threads}.")
    if workers is not None and workers < 1:
        raise StudyError(f"--workers must be >= 1, got {workers}; leave it out for one per core.")
    plans = plan_runs(study, smoke, seeds, conditions)
    paths = StudyPaths.of(study, out, smoke)
    # Any ok row with the run's current fingerprint counts, so undoing an edit to the study reuses the old runs.
    finished = {(r.get("run_id"), r.get("fingerprint")) for r in read_rows(paths.rows) if r.get("status") == "ok"}
    summary = RunSummary(len(plans))
    pending = []
    for p in plans:
        if (p.run_id, p.fingerprint) in finished:
            summary.skipped.append(p.run_id)
        else:
            pending.append(p)
    workers = min(workers or default_workers(threads), max(1, len(pending)))
    base = {"study": study.name, "smoke": smoke, "workers": workers, "threads": threads, "hardware": hardware()}
    print(f"study {study.name}{' (smoke)' if smoke else ''}: {len(plans)} runs, {len(summary.skipped)} finished "
          f"earlier, {len(pending)} to run on {workers} worker(s); output in {paths.root}", file=sys.stderr)

    with study_lock(paths):
        rejected = validate_plans(study, pending, paths, threads)
        for p in pending:
            if p.condition in rejected:
                append_row(paths.rows, base | _row_head(p, study, paths) | {
                    "status": "invalid", "error": rejected[p.condition], "metrics": {}, "config": None,
                    "log": paths.rel(paths.log(f"{p.condition}.validate")), "finished": _now(),
                })
                summary.invalid.append(p.run_id)
        todo = [p for p in pending if p.condition not in rejected]

        ctx = _process_context()
        bar = tqdm(total=len(plans), initial=len(plans) - len(todo), unit="run", desc=study.name, disable=not progress,
                   dynamic_ncols=True)
        queue, running = list(todo), {}
        try:
            with _sigterm_as_interrupt():
                while queue or running:
                    while queue and len(running) < workers:
                        job = _start(ctx, queue.pop(0), paths, threads)
                        running[job.process.sentinel] = job
                    # The main thread waits on the processes and alone appends rows: the rows file has one writer.
                    for sentinel in multiprocessing.connection.wait(list(running)):
                        row = _finish(running.pop(sentinel), study, paths, base)
                        append_row(paths.rows, row)
                        summary.executed.append(row["run_id"])
                        if row["status"] != "ok":
                            summary.failed.append(row["run_id"])
                            bar.write(f"run {row['run_id']} failed ({row['error']}); overrides {row['overrides']}; "
                                      f"log: {paths.root / row['log']}")
                        bar.set_postfix_str(f"last {row['run_id']} {row['status']} {row['wall_s']:.0f}s, "
                                            f"failed {len(summary.failed)}")
                        bar.update(1)
        except KeyboardInterrupt:
            _stop(list(running.values()))
            bar.write(f"interrupted: {len(summary.executed)} run(s) recorded; run the same command again to continue.")
            raise
        finally:
            bar.close()
    return summary
