"""Prefect flows: one per phase, the full pipeline, and the nightly retrain deployment.

Flows contain no ML logic: they run the DVC stages of `dvc.yaml`, so Prefect runs and
`dvc repro` share one cache and one `dvc.lock`.
"""
