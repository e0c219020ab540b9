"""Package-level promises: light import, Lightning 2.x namespace only."""

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_import_pulls_in_no_optional_backend():
    # Lightning itself may import some of these when installed; only what lightning_moe adds counts.
    code = (
        "import sys, lightning.pytorch, torchmetrics; before = set(sys.modules); "
        "import lightning_moe, lightning_moe.callbacks, lightning_moe.metrics, lightning_moe.adapters; "
        "print(sorted({m.split('.')[0] for m in set(sys.modules) - before} & "
        "{'matplotlib', 'transformers', 'datasets', 'pyarrow', 'tokenizers', 'megablocks', 'pytorch_lightning'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_no_pytorch_lightning_imports_in_the_package():
    offenders = [
        str(p) for p in (ROOT / "lightning_moe").rglob("*.py")
        if any(line.lstrip().startswith(("import pytorch_lightning", "from pytorch_lightning"))
               for line in p.read_text().splitlines())
    ]
    assert offenders == []


def test_adapters_are_reachable_after_a_plain_import():
    import lightning_moe

    assert callable(lightning_moe.adapters.record_routing)
