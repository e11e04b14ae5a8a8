"""The Triton launchers, with the names and signatures of :mod:`sqz_kernels.reference` (one file per
kernel; this module only gathers them). ``cluster_key_mask`` is a bookkeeping helper and stays torch."""
from __future__ import annotations

from .lookup import (
    LookupConfig,
    centroid_scores,
    centroid_selection,
    hierarchical_centroid_scores,
    hierarchical_centroid_selection,
    key_max_logprob,
)
from .merge import merge_attention
from .nearest import nearest_center
from .reference import cluster_key_mask
from .selection import select_clusters
from .sparse_attention import AttentionConfig, causal_attention, sparse_attention, squeezed_attention
from .worklist import build_worklist, select_worklist

__all__ = [
    "AttentionConfig",
    "LookupConfig",
    "build_worklist",
    "causal_attention",
    "centroid_scores",
    "centroid_selection",
    "cluster_key_mask",
    "hierarchical_centroid_scores",
    "hierarchical_centroid_selection",
    "key_max_logprob",
    "merge_attention",
    "nearest_center",
    "select_clusters",
    "select_worklist",
    "sparse_attention",
    "squeezed_attention",
]
