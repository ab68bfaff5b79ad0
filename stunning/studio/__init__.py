"""The style studio: interactive generation on a registered style model.

Modules (each one concept):

- ``preview``: live previews of a generation, a linear latent-to-RGB map fitted from the
  model's own VAE;
- ``blends``: saved request-time blends (style weights + negative prompt) as YAML files, and
  promoting one into params.yaml's ``merge.blends``;
- ``generate``: batch generation to PNG files with embedded parameters (``stunning generate``),
  resumable through an ``index.jsonl``;
- ``jobs``: queued, cancellable generation jobs with per-step progress and previews;
- ``keys``: API keys (stored hashed) for the HTTP API and the studio UI;
- ``ratelimit``: per-key token-bucket rate limiting for the HTTP API;
- ``negatives``: the negative-prompt optimizer and the saved per-style defaults;
- ``app``: the Gradio studio (``stunning studio``).

The HTTP API itself is :mod:`stunning.serve`; it and the studio UI use these modules.
"""
