"""UDS utility and selector against references written out here (svdvals, dense DFT, loops)."""

from __future__ import annotations

import math

import pytest
import torch

from adaptive.selection import FourierSketch, UDSSelector, uds_utility
from adaptive.selection.utility import nuclear_norms


def _reference_utility(logits, mask):
    out = []
    for i in range(logits.shape[0]):
        rows = logits[i] if mask is None else logits[i][mask[i].bool()]
        out.append(torch.linalg.svdvals(rows.double()).sum())
    return torch.stack(out)


def test_utility_matches_svdvals_of_unpadded_rows():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 9, 13, generator=g)
    mask = torch.ones(5, 9)
    mask[1, 6:] = 0  # right padding
    mask[2, :4] = 0  # left padding
    mask[3, 1:8] = 0
    got = uds_utility(logits, mask)
    torch.testing.assert_close(got.double(), _reference_utility(logits, mask), rtol=1e-5, atol=1e-5)
    # without the mask the padded rows count, and the value differs
    assert not torch.allclose(uds_utility(logits)[1], got[1])


def test_utility_of_class_logits_is_the_euclidean_norm():
    logits = torch.randn(7, 5)
    torch.testing.assert_close(uds_utility(logits), logits.norm(dim=1))


def test_utility_half_precision_and_bad_input():
    logits = torch.randn(3, 4, 6)
    got = uds_utility(logits.bfloat16())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, uds_utility(logits.bfloat16().float()))
    with pytest.raises(ValueError, match="attention_mask must have shape"):
        uds_utility(logits, torch.ones(3, 5))
    with pytest.raises(ValueError, match=r"\(batch, classes\) or \(batch, tokens, vocab\)"):
        uds_utility(torch.randn(3))
    with pytest.raises(ValueError, match="applies to"):
        uds_utility(torch.randn(3, 4), torch.ones(3, 4))


def _dense_sketch(sk: FourierSketch, x: torch.Tensor) -> torch.Tensor:
    """P(X) = scale · Re(F_T)[rows] D_T X_pad D_V Re(F_V)ᵀ[:, cols], DFT written as cosines."""
    t_max, v = sk.num_rows, sk.num_columns
    x = torch.nn.functional.pad(x.double(), (0, 0, 0, t_max - x.shape[0]))
    jv, jt = torch.arange(v, dtype=torch.float64), torch.arange(t_max, dtype=torch.float64)
    fv = torch.cos(2 * math.pi * sk.column_frequencies.double()[:, None] * jv / v) / math.sqrt(v)
    ft = torch.cos(2 * math.pi * sk.row_frequencies.double()[:, None] * jt / t_max)
    ft = ft / math.sqrt(t_max)
    y = ft @ torch.diag(sk.row_signs.double()) @ x @ torch.diag(sk.column_signs.double()) @ fv.T
    return (sk.scale * y).reshape(-1)


def test_sketch_equals_dense_transform_and_preserves_distances():
    sk = FourierSketch(16, 40, 8, 24, seed=3)
    x = torch.randn(4, 11, 40)
    got = sk(x)
    assert got.shape == (4, 8 * 24)
    for i in range(4):
        torch.testing.assert_close(got[i].double(), _dense_sketch(sk, x[i]), rtol=1e-4, atol=1e-4)
    # same seed: same map
    torch.testing.assert_close(FourierSketch(16, 40, 8, 24, seed=3)(x), got)


def _reference_selection(steps, k, alpha, memory_size, sketch):
    """Loop-by-loop UDS: z-scored utility + alpha z-scored mean distance to a FIFO memory."""
    memory: list[torch.Tensor] = []
    kept_all = []
    for logits, mask in steps:
        b = logits.shape[0]
        u = _reference_utility(logits, mask)
        p = [_dense_sketch(sketch, logits[i][mask[i].bool()]) for i in range(b)]
        d = torch.tensor(
            [sum(float((p[i] - m).norm()) for m in memory) / max(len(memory), 1) for i in range(b)],
            dtype=torch.float64,
        )

        def z(x):
            s = x.std(correction=0)
            return (x - x.mean()) / s if s > 1e-9 else torch.zeros_like(x)

        score = z(u) + alpha * z(d)
        order = sorted(range(b), key=lambda i: -float(score[i]))[:k]
        kept_all.append(order)
        memory = (memory + [p[i] for i in order])[-memory_size:]
    return kept_all


def test_selector_matches_bruteforce_over_steps_with_memory_overflow():
    g = torch.Generator().manual_seed(1)
    steps = []
    for _ in range(5):
        logits = torch.randn(10, 6, 20, generator=g) * (1 + torch.rand(10, 1, 1, generator=g))
        mask = torch.ones(10, 6)
        mask[::3, 4:] = 0
        steps.append((logits, mask))
    sel = UDSSelector(k=3, alpha=1.5, memory_size=7, projection_dim=(4, 8), max_length=6, seed=2)
    got = [sel(logits, mask).tolist() for logits, mask in steps]
    ref = _reference_selection(steps, 3, 1.5, 7, FourierSketch(6, 20, 4, 8, seed=2))
    assert got == ref
    assert sel.count == 7 and sel.memory().shape == (7, 32)


def test_selection_is_invariant_to_logit_scale_and_alpha_zero_is_utility_topk():
    g = torch.Generator().manual_seed(4)
    steps = [torch.randn(12, 5, generator=g) for _ in range(4)]
    a, b = UDSSelector(k=4, alpha=2.0), UDSSelector(k=4, alpha=2.0)
    for logits in steps:
        assert a(logits).tolist() == b(logits * 37.0).tolist()
    plain = UDSSelector(k=4, alpha=0.0)
    for logits in steps:
        assert plain(logits).tolist() == torch.topk(logits.norm(dim=1), 4).indices.tolist()


def test_state_dict_resumes_exactly_and_loads_weights_only(tmp_path):
    g = torch.Generator().manual_seed(5)
    steps = [torch.randn(8, 4, 30, generator=g) for _ in range(6)]
    full = UDSSelector(k=2, alpha=1.0, memory_size=5, max_length=4)
    ref = [full(x).tolist() for x in steps]
    first = UDSSelector(k=2, alpha=1.0, memory_size=5, max_length=4)
    for x in steps[:3]:
        first(x)
    torch.save(first.state_dict(), tmp_path / "uds.pt")
    resumed = UDSSelector(k=2, alpha=1.0, memory_size=5, max_length=4)
    resumed.load_state_dict(torch.load(tmp_path / "uds.pt", weights_only=True))
    assert [resumed(x).tolist() for x in steps[3:]] == ref[3:]
    torch.testing.assert_close(resumed.memory(), full.memory())
    with pytest.raises(ValueError, match="memory_size"):
        UDSSelector(k=2, alpha=1.0, memory_size=6).load_state_dict(first.state_dict())


def test_gather_puts_every_ranks_selection_in_memory():
    sel = UDSSelector(k=2, alpha=1.0, projection_dim=(1, 4))
    extra = torch.randn(2, 4)
    sel(torch.randn(6, 4), gather=lambda t: torch.cat([t, extra]))
    assert sel.count == 4
    torch.testing.assert_close(sel.memory()[2:], extra)


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="k must be a positive int"):
        UDSSelector(k=0, alpha=1.0)
    with pytest.raises(TypeError, match="k must be a positive int"):
        UDSSelector(k=2.5, alpha=1.0)
    with pytest.raises(ValueError, match="alpha must be a finite real number >= 0"):
        UDSSelector(k=2, alpha=-1.0)
    with pytest.raises(TypeError, match="projection_dim must be a pair"):
        UDSSelector(k=2, alpha=1.0, projection_dim=1024)
    sel = UDSSelector(k=2, alpha=1.0, max_length=4)
    with pytest.raises(ValueError, match="exceeds max_length=4"):
        sel(torch.randn(3, 5, 7))
    sel(torch.randn(3, 4, 7))
    with pytest.raises(ValueError, match="one selector serves one model"):
        sel(torch.randn(3, 4, 8))


@pytest.mark.parametrize("shape", [(3, 5, 400), (2, 7, 3), (4, 1, 9), (2, 6, 6)])
def test_nuclear_norms_from_the_gram_matrix_equal_svd(shape):
    """Wide (tokens < vocabulary), tall, one row and square matrices, one of them rank-deficient."""
    torch.manual_seed(0)
    m = torch.randn(shape) * 3.0
    m[0, -1] = m[0, 0]  # a repeated row: a zero singular value
    want = torch.linalg.svdvals(m.double()).sum(dim=-1)
    got = nuclear_norms(m)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_per_row_utility_divides_the_nuclear_norm_by_the_unmasked_rows():
    """Utility-only selection (α = 0) with ``per_row_utility``: top-k of ‖L_i‖_* / n_i, with the
    nuclear norm from a float64 SVD of the unpadded rows written out here."""
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(9, 6, 11, generator=g)
    mask = torch.ones(9, 6)
    lengths = [6, 2, 5, 3, 6, 1, 4, 2, 6]
    for i, n in enumerate(lengths):
        mask[i, n:] = 0
    want = torch.stack(
        [torch.linalg.svdvals(logits[i, :n].double()).sum() / n for i, n in enumerate(lengths)]
    )
    sel = UDSSelector(k=3, alpha=0.0, per_row_utility=True, max_length=6)
    assert sel(logits, mask).tolist() == torch.topk(want, 3).indices.tolist()
    torch.testing.assert_close(sel.last_utility.double(), want, rtol=1e-5, atol=0)
    # the paper's utility (no division) prefers the long rows
    plain = UDSSelector(k=3, alpha=0.0, max_length=6)
    assert min(lengths[i] for i in plain(logits, mask).tolist()) >= 5
    with pytest.raises(TypeError, match="per_row_utility"):
        UDSSelector(k=3, alpha=0.0, per_row_utility=1)
