"""``lightning-moe study run|report <study folder>``: run a study's grid and write its report.

Exit status: 0 when every run finished (claims that fail are results, not errors), 1 when a run failed or a
condition was rejected (the report is still written), 2 when the study file or the command is wrong.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING
from pathlib import Path

from lightning_moe.studies.spec import Study, StudyError, load_study, plan_runs

if TYPE_CHECKING:
    from lightning_moe.studies.runner import RunSummary


def _parser() -> argparse.ArgumentParser:
    """``study run`` and ``study report`` with their shared options."""
    parser = argparse.ArgumentParser(
        prog="lightning-moe study",
        description="Run every condition x seed of a study (resumable, in parallel) and write its report.",
    )
    sub = parser.add_subparsers(dest="action", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("study", help="study folder (containing study.yaml) or the study file")
    common.add_argument("--smoke", action="store_true",
                        help="apply the study's smoke block; runs and report go to <out>/smoke/")
    common.add_argument("--seeds", type=int, nargs="+", help="replace the study's seeds")
    common.add_argument("--conditions", nargs="+", help="only these conditions")
    common.add_argument("--no-companions", action="store_true",
                        help="only this study, not the companion studies its study.yaml lists")
    common.add_argument("--out", help="output folder of the runs and, when given, of the report (default: "
                        "runs/studies/<study name>, with the report in the study folder)")
    run = sub.add_parser("run", parents=[common], help="run what is not finished yet, then write the report")
    run.add_argument("--workers", type=int, help="parallel runs (default: one per usable CPU core / --threads)")
    run.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1)")
    run.add_argument("--dry-run", action="store_true",
                     help="list the runs and their commands and validate the overrides; train nothing")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    sub.add_parser("report", parents=[common], help="rebuild the report from the finished runs (by default from "
                   "the study's shipped records/ when it has them)")
    return parser


def _run_and_report(
    study: Study, args: argparse.Namespace, out: str | Path | None, companions: Sequence[str] = (),
    companions_run_s: float = 0.0,
) -> tuple[Path, RunSummary | None, str, float]:
    """Run (for ``run``) and report one study; ``(report path, run summary or None, claims line, summed run
    seconds)``."""
    from lightning_moe.studies.report import REPORT_FILE, claims_line, write_report
    from lightning_moe.studies.runner import StudyPaths, export_records, run_study

    plans = plan_runs(study, args.smoke, args.seeds, args.conditions)
    paths = StudyPaths.of(study, out, args.smoke)
    summary = None
    if args.action == "run":
        summary = run_study(
            study, smoke=args.smoke, workers=args.workers, threads=args.threads, seeds=args.seeds,
            conditions=args.conditions, out=out, progress=not args.no_progress,
        )
    default = not args.smoke and out is None
    if default and args.action == "run":
        paths = export_records(study, paths)
    elif default and StudyPaths.of_records(study).rows.is_file():
        paths = StudyPaths.of_records(study)
    kept = paths.report_dir / REPORT_FILE
    if args.action == "report" and not paths.rows.is_file() and kept.is_file():
        # Neither shipped records nor runs here: rebuilding would replace the committed report with an empty one.
        print(f"{study.name}: no records and no runs in {paths.root}; {kept} is kept as it is", file=sys.stderr)
        return kept, None, "kept as committed (no shipped records to rebuild it from)", 0.0
    report, claims, run_s = write_report(study, plans, paths, args.smoke, companions, companions_run_s)
    line = claims_line(claims) if claims else "no claims"
    print(f"report: {report}", file=sys.stderr)
    return report, summary, line, run_s


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``lightning-moe study``; returns the exit status."""
    from lightning_moe.studies.report import companions_section
    from lightning_moe.studies.runner import StudyPaths, validate_plans

    args = _parser().parse_args(argv)
    summaries = []
    try:
        study = load_study(args.study)
        if args.action == "run" and args.dry_run:
            plans = plan_runs(study, args.smoke, args.seeds, args.conditions)
            paths = StudyPaths.of(study, args.out, args.smoke)
            for p in plans:
                print(f"{p.run_id}: lightning-moe {shlex.join(p.cli_args(Path.cwd()))}")
            return 1 if validate_plans(study, plans, paths, args.threads) else 0
        # Companions come with a whole-study command only: --seeds and --conditions name this study's.
        companions = [] if args.seeds or args.conditions or args.no_companions else study.companions
        done = []
        for folder in companions:
            companion = load_study(folder)
            out = None if args.out is None else Path(args.out) / companion.name
            report, summary, line, run_s = _run_and_report(companion, args, out)
            summaries.append(summary)
            done.append((companion, report, line, run_s))
        report_dir = StudyPaths.of(study, args.out, args.smoke).report_dir
        _, summary, _, _ = _run_and_report(study, args, args.out, companions_section(report_dir, done),
                                           sum(d[3] for d in done))
        summaries.append(summary)
    except StudyError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130  # the conventional status of a command stopped by Ctrl-C; the runner said what was kept
    failed = [s for s in summaries if s is not None and not s.ok]
    if failed:
        print(f"{sum(len(s.failed) for s in failed)} run(s) failed and {sum(len(s.invalid) for s in failed)} were "
              "rejected; see the reports' Problems sections.", file=sys.stderr)
        return 1
    return 0
