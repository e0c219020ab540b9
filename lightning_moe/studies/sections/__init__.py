"""Study-specific report sections (tables, heatmaps, curves built from the runs' artifacts), one module per study,
named by ``sections:`` in the study's ``study.yaml``."""
