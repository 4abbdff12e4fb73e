"""Evaluation beyond the run's own rewards: the WISE benchmark with a local judge (``wise``, ``judge``), the
understanding retention probe (``understanding``), the sampling path ``rgpo sample`` shares (``sampling``) and the
in-loop hook the trainer calls (``loop``). Nothing here names a model family: models are reached through
``rgpo.models.UnifiedModel``."""
