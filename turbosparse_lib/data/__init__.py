"""Offline data: sources from package registries, a categorised training corpus,
the held-out WikiText-2 stand-in, a mixture sampler and tokenised splits."""

from .sources import DataError, fetch_all, load_manifest  # noqa: F401
