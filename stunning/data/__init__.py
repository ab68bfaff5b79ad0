"""Data for the pipeline: the embedded sample set, robust image loading, ingest and curation.

Modules: :mod:`.sample` (procedural sample photos), :mod:`.images` (decode, normalise,
score), :mod:`.ingest` (raw folders -> normalised images + manifest + rejection report),
:mod:`.curate` (filters, split, statistics) and :mod:`.expectations` (the Great
Expectations suite over the curated manifest). This package file stays import-light: it
only defines the error type the stages catch.
"""

from __future__ import annotations


class DataError(ValueError):
    """A problem with the user's data a person can fix; the message says where and what to do."""


__all__ = ["DataError"]
