"""The torch twin's two ways of reading a selection (``reference.sparse_attention``): gathering the kept keys
(large layers, sparse selections: the CPU engine's decode) and one masked pass over every key. Both against
dense SDPA given the same keys as a boolean mask."""
from __future__ import annotations

import kernel_cases  # tests/ is on the path under pytest
import pytest
import torch

from sqz_kernels import reference as ref

N_KEYS = 4200  # above reference._GATHER_MIN_KEYS: the gathered path is the one a sparse selection takes
N_CLUSTERS = 210
TAIL = 7  # always-kept keys after the clustered ones


def _corpus(kvh: int, d: int, dtype: torch.dtype, gen: torch.Generator, tail: int = TAIL):
    """kernel_cases' clustered corpus (uneven sizes, empty clusters): keys, values, offsets."""
    keys, values, offs, _, _ = kernel_cases.corpus(kvh, N_CLUSTERS, N_KEYS, tail, d, str(dtype).removeprefix("torch."),
                                                   "cpu", gen)
    return keys, values, offs


def _dense(q, keys, values, mask, scale):
    """SDPA over every key with the kept ones as a boolean mask: (B, H, T, D) float32."""
    b, h, t, d = q.shape
    kvh = keys.shape[0]
    k = keys.float().repeat_interleave(h // kvh, 0).expand(b, -1, -1, -1)
    v = values.float().repeat_interleave(h // kvh, 0).expand(b, -1, -1, -1)
    m = mask.repeat_interleave(h // kvh, 1)[:, :, None, :].expand(b, h, t, -1)
    return torch.nn.functional.scaled_dot_product_attention(q.float(), k, v, attn_mask=m, scale=scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("b,kvh,g,t,d", [(1, 3, 3, 1, 64), (2, 2, 4, 5, 32), (1, 1, 1, 2, 128)])
def test_gathered_read_matches_masked_and_dense(dtype, b, kvh, g, t, d):
    gen = torch.Generator().manual_seed(b * 100 + kvh * 10 + t)
    keys, values, offs = _corpus(kvh, d, dtype, gen)
    c = offs.shape[1] - 1
    q = torch.randn(b, kvh * g, t, d, generator=gen).to(dtype)
    selected = torch.rand(b, kvh, c, generator=gen) < 0.2
    scale = d ** -0.5
    mask = ref.cluster_key_mask(selected, offs, N_KEYS)
    assert int(mask.sum(-1).max()) <= ref._GATHER_MAX_SHARE * N_KEYS  # the gathered path, not the masked one

    out, lse = ref.sparse_attention(q, keys, values, offs, selected, scale)
    qg = ref._group_queries(q, kvh)
    m_out, m_lse = ref._masked_attention(qg, keys.unsqueeze(0), values.unsqueeze(0), mask[:, :, None, None, :], scale)
    torch.testing.assert_close(out, m_out.reshape(b, kvh * g, t, d), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, m_lse.reshape(b, kvh * g, t), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, _dense(q, keys, values, mask, scale), atol=1e-4, rtol=1e-4)


def test_gathered_read_empty_row_and_keep_all():
    """A row with no key at all (no always-kept keys, nothing selected) gets out 0 and lse -inf; a row keeping
    every key next to it and a selection of every key (the masked pass without a mask) equal dense attention."""
    gen = torch.Generator().manual_seed(7)
    keys, values, offs = _corpus(2, 32, torch.float32, gen, tail=0)
    c = offs.shape[1] - 1
    q = torch.randn(3, 2 * 2, 1, 32, generator=gen)
    selected = torch.rand(3, 2, c, generator=gen) < 0.1
    selected[1] = False  # row 1: nothing
    out, lse = ref.sparse_attention(q, keys, values, offs, selected, 0.2)
    assert torch.all(out[1] == 0) and torch.all(torch.isneginf(lse[1]))
    mask = ref.cluster_key_mask(selected, offs, N_KEYS)
    for row in (0, 2):
        torch.testing.assert_close(out[row:row + 1], _dense(q[row:row + 1], keys, values, mask[row:row + 1], 0.2),
                                   atol=1e-4, rtol=1e-4)

    everything = torch.ones(3, 2, c, dtype=torch.bool)
    out_all, _ = ref.sparse_attention(q, keys, values, offs, everything, 0.2)
    torch.testing.assert_close(out_all, _dense(q, keys, values, torch.ones(3, 2, N_KEYS, dtype=torch.bool), 0.2),
                               atol=1e-4, rtol=1e-4)
