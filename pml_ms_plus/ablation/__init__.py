"""``pml-ms-plus ablate``: a reproducible ablation study of the MS loss family.

Modules: ``data`` (offline data sets), ``model`` (embedding networks),
``config`` (variants, TOML configs), ``train`` (training and retrieval
evaluation), ``report`` (CSV/JSON/Markdown/plots), ``cli`` (the command).
"""
