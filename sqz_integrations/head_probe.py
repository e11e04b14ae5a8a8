"""Find, once per corpus, the heads whose sharp attention the centroids miss (retrieval heads).

Retrieval and copy heads give almost all of a query's attention to the one or two corpus keys that
match it token by token, and such a key can sit in a loose cluster whose centroid scores it far
below its own logit (measured, SmolLM2 NIAH: a layer-7 head put 0.96-0.98 of its attention on the
needle's key, whose centroid scored it 18 nats lower; the key was no outlier of its cluster).
The probe makes those heads fire: a question that quotes passages of the corpus back, so each
quoted token has an exact earlier occurrence to attend to. It is read over the whole corpus, and
for every (layer, KV head) we add up the focused attention (keys given at least 5% of a query
head's attention, :func:`~sqz_integrations.selection.focused_attention`) that a decode-time selection at a reference budget would have dropped.
Heads ranked first by that missed mass are the ones a :class:`ReadPlan` reads in full.
"""
from __future__ import annotations

import torch

from sqz_kernels import reference

from .selection import CorpusRead, ReadPlan, focused_attention

# Passages quoted by the probe, and tokens per passage; spread evenly over the clustered tokens.
QUESTION_LEAD = "Where do these passages appear in the documents?"
N_PASSAGES = 4
PASSAGE_TOKENS = 24


def probe_question(token_ids: list[int], clustered: torch.Tensor, decode) -> str:
    """A question quoting ``N_PASSAGES`` passages of the corpus (``clustered``: their token indices)."""
    n = clustered.numel()
    length = min(PASSAGE_TOKENS, max(1, n // N_PASSAGES))
    starts = [int(clustered[min(n - length, int(n * (i + 0.5) / N_PASSAGES))]) for i in range(N_PASSAGES)]
    quotes = [decode(token_ids[s : s + length]).strip() for s in starts]
    lines = "\n".join(f'{i + 1}. "{q}"' for i, q in enumerate(quotes))
    return f"{QUESTION_LEAD}\n{lines}"


class MissedFocus(CorpusRead):
    """Reads the corpus in full (``plan``) while measuring, per layer and KV head, the focused
    attention that a threshold selection at ``log_threshold`` (one decode-time lookup per token) drops."""

    def __init__(self, corpus, plan: ReadPlan, log_threshold: float):
        super().__init__(corpus, plan, track_sources=False)
        self.log_threshold = log_threshold
        kvh = corpus.layers[0].keys.shape[0]
        self.missed = torch.zeros(len(corpus.layers), kvh, dtype=torch.float64)
        self.tokens = 0

    def attend(self, layer_idx, q, dyn_k, dyn_v, scale):
        out = super().attend(layer_idx, q, dyn_k, dyn_v, scale)
        layer = self.corpus.layers[layer_idx]
        kvh, n, _ = layer.keys.shape
        g = q.shape[1] // kvh
        for t0, t1, p in focused_attention(q, layer.keys, dyn_k, scale):
            # every token of the slice as its own decode read: (T', H, 1, D)
            per_token = q[0, :, t0:t1].transpose(0, 1).unsqueeze(2)
            scores = reference.centroid_scores(per_token, layer.centroids, layer.log_counts, scale)
            selected = reference.select_clusters(
                scores, layer.log_counts, log_threshold=self.log_threshold
            )
            dropped = ~reference.cluster_key_mask(selected, layer.cluster_offsets, n).transpose(0, 1).unsqueeze(1)
            self.missed[layer_idx] += ((p[0] * dropped).sum(dim=(1, 2, 3)) / g).double().cpu()
        if layer_idx == 0:
            self.tokens += q.shape[2]
        return out

    def missed_per_token(self) -> torch.Tensor:
        """(layers, kv_heads): mean focused attention mass per probe token that the selection dropped."""
        return self.missed / max(1, self.tokens)
