"""The codebook's own procedures (vqvae/quantizer/codebook.py): seeding from the first batch, one EMA step per
accumulate() block, and taking over a codebook trained elsewhere. (Its health rules: test_health.py.)"""

import pytest
import torch

from vqvae.quantizer import VectorQuantizer
from vqvae.quantizer.health import AffineReparam

K, D = 24, 8


def _batch(step, rank, rows=40):
    return torch.randn(rows, D, generator=torch.Generator().manual_seed(1000 * step + rank))



@pytest.mark.parametrize("init", ["kmeans++", "random"])
def test_no_two_codes_are_seeded_on_the_same_vector_while_the_batch_allows(init, device):
    """Half the batch is copies of one vector: the codes still start on distinct vectors (two identical codes
    would tie for every row near them)."""
    rows = torch.randn(1023, 5, device=device)
    rows[500:] = rows[0]
    quantizer = VectorQuantizer(300, 5, backend="torch", init=init).to(device)
    quantizer.codebook.initialise_(rows)
    assert len(set(map(tuple, quantizer.codebook.codes.tolist()))) == 300


@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("memory", [0, 10])
def test_a_codebook_taken_over_is_past_its_warmup_and_its_rules_start_from_its_counts(affine, memory, device):
    """What an adapter's import from another package gives: its codes, counts and sums, then a step on rows that
    sit on their codes leaves them there (an unmeasured frame is measured on that batch and moves no code)."""
    quantizer = VectorQuantizer(8, 4, backend="torch", affine_reparam=affine, dead_code_memory=memory).to(device)
    codes = torch.randn(8, 4, device=device)
    quantizer.codebook.take_over_({"codes": codes, "cluster_size": torch.full((8,), 3.0, device=device),
                                   "embed_sum": codes * 3.0, "initialized": torch.tensor(True)})
    codebook = quantizer.codebook
    assert abs(codebook.current_decay().item() - 0.99) < 1e-6, "past its warm-up"
    assert torch.equal(codebook.activity(), codebook.cluster_size), "the rules' own counts start from its counts"
    assert not quantizer.dead_codes().any()
    quantizer(codes.repeat(3, 1))
    torch.testing.assert_close(codebook.codes, codes, rtol=1e-5, atol=1e-5)
    if affine:
        torch.testing.assert_close(AffineReparam.moments(codebook)[0], codes.mean(dim=0))


def test_taking_over_a_tensor_the_codebook_does_not_have_is_refused_by_name():
    quantizer = VectorQuantizer(8, 4)
    before = {k: v.clone() for k, v in quantizer.state_dict().items()}
    with pytest.raises(KeyError, match=r"no tensor \['embed_avg'\]"):
        quantizer.codebook.take_over_({"codes": torch.zeros(8, 4), "embed_avg": torch.zeros(8, 4)})
    assert all(torch.equal(v, quantizer.state_dict()[k]) for k, v in before.items()), "nothing changed"


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_accumulated_micro_batches_make_one_ema_step(backend, device, fixed_start):
    # without the affine re-parameterisation, which follows each micro-batch as it comes (test_health.py)
    micro = [_batch(0, r).to(device) for r in range(3)]
    options = dict(backend=backend, dead_code_threshold=0.0, affine_reparam=False)
    accumulated = fixed_start(VectorQuantizer(K, D, **options).to(device))
    whole = fixed_start(VectorQuantizer(K, D, **options).to(device))
    before = accumulated.codebook.codes.clone()
    with accumulated.accumulate() as step:
        outs = [accumulated(x) for x in micro]
        assert torch.equal(accumulated.codebook.codes, before), "the codebook must wait for the end of the block"
    ref = whole(torch.cat(micro))
    assert step.dead_codes == ref.dead_codes
    assert torch.equal(torch.cat([o.indices for o in outs]), ref.indices)
    for name in ("codes", "cluster_size", "embed_sum"):
        torch.testing.assert_close(getattr(accumulated.codebook, name), getattr(whole.codebook, name), rtol=1e-5, atol=1e-6)


def test_accumulate_blocks_do_not_nest():
    quantizer = VectorQuantizer(K, D)
    with quantizer.accumulate(), pytest.raises(RuntimeError, match="cannot be nested"):
        with quantizer.accumulate():
            pass
