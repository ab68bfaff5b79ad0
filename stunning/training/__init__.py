"""Training: the curated dataset, the LoRA trainer and its resumable checkpoints.

- :mod:`stunning.training.dataset` — manifest rows of one style/split as pixel tensors + captions;
- :mod:`stunning.training.lora` — :func:`~stunning.training.lora.train_style`, one adapter per style;
- :mod:`stunning.training.checkpoint` — fingerprinted, atomically written, pruned checkpoints;
- :mod:`stunning.training.batch` — out-of-memory detection and `batch_size: auto` probing;
- :mod:`stunning.training.thermal` — the thermal guard that pauses a throttling machine.

Submodules are imported explicitly (they pull in torch); this package imports nothing.
"""
