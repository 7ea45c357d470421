"""Reports over a sweep's MLflow records: ``python -m dashboards.report --experiment NAME --out report.html``.

The dashboards only read MLflow (runs, params, tags, metric histories, artifact
paths); they never recompute a metric. ``records`` reads, ``importance`` turns
child runs into an in-memory Optuna study, ``figures`` draws with matplotlib's
Agg canvas, ``page`` writes one self-contained page and ``report`` is the CLI.
"""
