"""The style studio: interactive generation on a registered style model.

Modules (each one concept):

- ``preview``: live previews of a generation, a linear latent-to-RGB map fitted from the
  model's own VAE;
- ``blends``: saved request-time blends (style weights + negative prompt) as YAML files, and
  promoting one into params.yaml's ``merge.blends``;
- ``generate``: batch generation to PNG files with embedded parameters (``stunning generate``),
  resumable through an ``index.jsonl``;
- ``jobs``: queued, cancellable generation jobs with per-step progress and previews;
- ``keys``: API keys for the studio's HTTP endpoints;
- ``negatives``: negative-prompt defaults and choices;
- ``app``: the studio's HTTP endpoints.
"""
