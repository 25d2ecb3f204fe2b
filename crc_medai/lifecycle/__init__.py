"""Model lifecycle: tracked training runs, the MLflow model registry, evaluation gates and live deployment.

- :mod:`.tracking`: the MLflow client (SQLite store, artifacts in MinIO) and training run records.
- :mod:`.kinds`: the files the registry stores, loads and evaluates for each model kind.
- :mod:`.registry`: versions, the ``champion`` and ``challenger`` aliases, promotion and rollback.
- :mod:`.gate`: the evaluation gate a candidate passes before promotion.
- :mod:`.events`: deployment events on the ``models`` topic.
- :mod:`.switcher`: the champion a Faust agent runs, swapped between batches.
"""
