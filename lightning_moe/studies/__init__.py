"""Study runner and reports: a study file (``recipes/<study>/study.yaml``) names base LightningCLI configs, a grid of
overrides x seeds, the metrics to collect, the paper's numbers and the claims to check; ``lightning-moe study run``
runs it resumably in parallel subprocesses and writes ``REPORT.md``. Nothing here imports yaml or matplotlib at
import time."""

from lightning_moe.studies.claims import Claim, Ref, Term, Verdict, evaluate
from lightning_moe.studies.spec import Condition, PaperValue, RunPlan, Study, StudyError, load_study, plan_runs

__all__ = [
    "Claim", "Condition", "PaperValue", "Ref", "RunPlan", "Study", "StudyError", "Term", "Verdict", "evaluate",
    "load_study", "plan_runs",
]
