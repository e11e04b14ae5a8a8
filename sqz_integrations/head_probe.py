"""Find, once per corpus, the heads whose sharp attention the centroids miss (retrieval heads).

Retrieval and copy heads give almost all of a query's attention to the one or two corpus keys that
match it token by token, and such a key can sit in a loose cluster whose centroid scores it far
below its own logit (measured, SmolLM2 NIAH: a layer-7 head put 0.96-0.98 of its attention on the
needle's key, whose centroid scored it 18 nats lower; the key was no outlier of its cluster).
The probe makes those heads fire: a question that quotes passages of the corpus back, so each
quoted token has an exact earlier occurrence to attend to. It is read over the whole corpus, and
for every (layer, KV head) we add up the focused attention (keys given at least ``FOCUS`` of a
query head's attention) that a decode-time selection at a reference budget would have dropped.
Heads ranked first by that missed mass are the ones a :class:`ReadPlan` reads in full.
"""
from __future__ import annotations

import torch

from sqz_kernels import reference

from .selection import CorpusRead, ReadPlan

# A key counts as a head's focus when it gets at least this share of the head's attention.
FOCUS = 0.05
# Passages quoted by the probe, and tokens per passage; spread evenly over the clustered tokens.
N_PASSAGES = 4
PASSAGE_TOKENS = 24
# Largest logits slice (float32 elements) the probe materialises at once: 2**26 is 256 MB.
MAX_ELEMENTS = 2**26


def probe_question(token_ids: list[int], clustered: torch.Tensor, decode) -> str:
    """A question quoting ``N_PASSAGES`` passages of the corpus (``clustered``: their token indices)."""
    n = clustered.numel()
    length = min(PASSAGE_TOKENS, max(1, n // N_PASSAGES))
    starts = [int(clustered[min(n - length, int(n * (i + 0.5) / N_PASSAGES))]) for i in range(N_PASSAGES)]
    quotes = [decode(token_ids[s : s + length]).strip() for s in starts]
    lines = "\n".join(f'{i + 1}. "{q}"' for i, q in enumerate(quotes))
    return f"Where do these passages appear in the documents?\n{lines}"


class MissedFocus(CorpusRead):
    """Reads the corpus in full (``plan``) while measuring, per layer and KV head, the focused
    attention that the selection of ``reference_plan`` (one decode-time lookup per token) drops."""

    def __init__(self, corpus, plan: ReadPlan, reference_plan: ReadPlan):
        super().__init__(corpus, plan, track_sources=False)
        self.reference_plan = reference_plan
        kvh = corpus.layers[0].keys.shape[0]
        self.missed = torch.zeros(len(corpus.layers), kvh, dtype=torch.float64)
        self.tokens = 0

    def attend(self, layer_idx, q, dyn_k, dyn_v, scale):
        out = super().attend(layer_idx, q, dyn_k, dyn_v, scale)
        layer = self.corpus.layers[layer_idx]
        t, n, m = q.shape[2], layer.keys.shape[1], dyn_k.shape[2]
        # tokens per slice: the slice's logits (heads x tokens x keys float32) stay under MAX_ELEMENTS,
        # so a 512K-token corpus is probed in slices of a few tokens instead of one 10 GB matrix
        step = max(1, MAX_ELEMENTS // (q.shape[1] * (n + m)))
        missed = sum(self._missed(layer, q, dyn_k, scale, t0, min(t, t0 + step)) for t0 in range(0, t, step))
        self.missed[layer_idx] += missed.double().cpu()
        if layer_idx == 0:
            self.tokens += t
        return out

    def _missed(self, layer, q, dyn_k, scale, t0: int, t1: int) -> torch.Tensor:
        """(kv_heads,): summed over the probe tokens ``t0:t1``, the focused mass their selection drops."""
        h, t, d = q.shape[1:]
        kvh, n, _ = layer.keys.shape
        g, m = h // kvh, dyn_k.shape[2]
        # every token as its own decode read: (T, H, 1, D)
        per_token = q[0, :, t0:t1].transpose(0, 1).unsqueeze(2)
        scores = reference.centroid_scores(per_token, layer.centroids, layer.log_counts, scale)
        selected = reference.select_clusters(scores, layer.log_counts, log_threshold=self.reference_plan.log_threshold[0])
        dropped = ~reference.cluster_key_mask(selected, layer.cluster_offsets, n).transpose(0, 1).unsqueeze(1)
        qg = q[0, :, t0:t1].reshape(kvh, g, t1 - t0, d)
        logits = torch.matmul(qg, layer.keys.transpose(-1, -2).unsqueeze(1)).float() * scale  # KVH, G, T, N
        dyn = torch.matmul(qg, dyn_k[0].transpose(-1, -2).unsqueeze(1)).float() * scale  # KVH, G, T, M
        pos = torch.arange(t0, t1, device=q.device) + m - t
        dyn = dyn.masked_fill(torch.arange(m, device=q.device)[None, :] > pos[:, None], float("-inf"))
        p = torch.exp(logits - torch.logaddexp(torch.logsumexp(logits, -1), torch.logsumexp(dyn, -1)).unsqueeze(-1))
        return (p * (p >= FOCUS) * dropped).sum(dim=(1, 2, 3)) / g

    def missed_per_token(self) -> torch.Tensor:
        """(layers, kv_heads): mean focused attention mass per probe token that the selection dropped."""
        return self.missed / max(1, self.tokens)
