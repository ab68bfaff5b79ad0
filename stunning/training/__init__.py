"""Training: one LoRA style adapter per style, resumable and reproducible; one concept per module.

- :mod:`stunning.training.trainer` — :func:`~stunning.training.trainer.train_style`: run, fingerprint, adapter, summary;
- :mod:`stunning.training.loop` — the training loop in named steps, returning a :class:`~.loop.LoopResult`;
- :mod:`stunning.training.adapter` — the LoRA adapter's PEFT configuration (rank, alpha, target modules/blocks);
- :mod:`stunning.training.precision` — mixed precision per device, autocast, CPU thread count and calibration;
- :mod:`stunning.training.batch` — `batch_size: auto`: probing the largest batch that fits;
- :mod:`stunning.training.memory` — out-of-memory detection and freeing memory after a failed attempt;
- :mod:`stunning.training.encoding` — latents and prompt embeddings before the loop, bucket size checks;
- :mod:`stunning.training.cache` — the on-disk cache of encoded images and captions;
- :mod:`stunning.training.dreambooth` — instance prompt, trigger words, class images of prior preservation;
- :mod:`stunning.training.evaluation` — the fixed-noise validation loss;
- :mod:`stunning.training.samples` — sample images during and after training;
- :mod:`stunning.training.rng` — adapter weights and RNG states: what an exact resume (or a rewind) needs;
- :mod:`stunning.training.checkpoint` — fingerprinted, atomically written, pruned checkpoints;
- :mod:`stunning.training.dataset` — manifest rows of one style/split as pixel tensors + captions;
- :mod:`stunning.training.thermal` — the thermal guard that pauses a throttling machine.

Submodules are imported explicitly (they pull in torch); this package imports nothing.
"""
