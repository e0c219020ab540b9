"""The one batch dialect. Every DataModule yields a dict with ``tokens`` (int64 ``[B, S]``) and ``labels``
(int64 ``[B, S]``, the next tokens, :data:`IGNORE_INDEX` where a position is not scored), plus, where known,
per-token ``domain_ids`` and ``task_ids`` and an ``attention_mask``. Modules and monitors read these keys only,
so every monitor can watch every data module."""

IGNORE_INDEX = -100  # F.cross_entropy's default ignore_index: labels equal to it are not scored
