"""Worker-side code: everything a Ray worker imports (models, data, defenses, attacks,
evaluation, the training loop). Nothing here imports Ray Tune, MLflow or ``platform``."""
