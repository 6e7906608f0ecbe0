"""Codes learned by gradient (`learning="gradient"`), as SimVQ's map of a frozen base (`"simvq"`), and the rotation
trick: gradients against plain PyTorch, the rotation against its formula, SimVQ against vector-quantize-pytorch's,
restarts carried into the parameters, torch.compile, and two processes keeping one codebook."""

import faulthandler

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
import vector_quantize_pytorch as vqp

from vqvae.quantizer import VectorQuantizer
from vqvae.quantizer.adapters import SimVQ
from vqvae.quantizer.vector_quantizer import _RotationTrick

K, D = 37, 6
LEARNINGS = ["ema", "gradient", "simvq"]


def _seeded(learning, backend="torch", device="cpu", **options):
    """A quantizer past its first batch, with random learned parameters (away from the seeding's identity map)."""
    options = {"dead_code_threshold": 0.0, "kmeans_init_iters": 0, "affine_reparam": False, **options}
    quantizer = VectorQuantizer(K, D, learning=learning, backend=backend, **options).to(device)
    quantizer(torch.randn(64, D, device=device))
    with torch.no_grad():
        if learning == "gradient":
            quantizer.codebook.weight.copy_(torch.randn(K, D, device=device))
        elif learning == "simvq":
            quantizer.codebook.base.copy_(torch.randn(K, D, device=device))
            quantizer.codebook.map_weight.copy_(torch.eye(D, device=device) + 0.3 * torch.randn(D, D, device=device))
    return quantizer


def _plain_codes(quantizer, params: dict) -> torch.Tensor:
    """The codes from the parameters, written out in plain PyTorch."""
    learning = quantizer.options.learning
    if learning == "ema":
        codes = params["codes"]
    elif learning == "gradient":
        codes = params["weight"]
    else:
        codes = params["base"] @ params["map_weight"].T
    return F.normalize(codes, dim=1) if quantizer.options.cosine and learning != "ema" else codes


def _plain_rotation(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """q written as s R x with R and s held constant (the rotation trick's formula, arXiv 2410.06424 eq. 4.2)."""
    x_dir = (x / x.norm(dim=-1, keepdim=True)).detach()
    q_dir = (q / q.norm(dim=-1, keepdim=True)).detach()
    w = F.normalize(x_dir + q_dir, dim=-1).detach()
    scale = (q.norm(dim=-1, keepdim=True) / x.norm(dim=-1, keepdim=True)).detach()
    dot = lambda a, b: (a * b).sum(dim=-1, keepdim=True)  # noqa: E731
    return scale * (x - 2 * dot(x, w) * w + 2 * dot(x, x_dir) * q_dir)


@pytest.mark.parametrize("learning", LEARNINGS)
@pytest.mark.parametrize("rotation_trick", [False, True])
@pytest.mark.parametrize("cosine", [False, True])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gradients_match_plain_pytorch(learning, rotation_trick, cosine, backend, device):
    quantizer = _seeded(learning, backend, device, cosine=cosine, rotation_trick=rotation_trick)
    names = {"ema": ["codes"], "gradient": ["weight"], "simvq": ["base", "map_weight"]}[learning]
    params = {n: getattr(quantizer.codebook, n).detach().clone().requires_grad_(n in ("weight", "map_weight"))
              for n in names}
    x = torch.randn(3, 5, D, device=device, requires_grad=True)
    upstream = torch.randn(3, 5, D, device=device)
    out = quantizer(x)
    (out.quantized * upstream).sum().add(out.loss).backward()

    x_plain = x.detach().clone().requires_grad_()
    z = x_plain.reshape(-1, D)
    z = F.normalize(z, dim=1) if cosine else z
    codes = _plain_codes(quantizer, params)
    chosen = out.indices.reshape(-1)
    distances = torch.cdist(z.detach().double(), codes.detach().double())
    assert (distances.gather(1, chosen[:, None]).squeeze(1) <= distances.min(dim=1).values + 1e-5).all()
    q = codes[chosen]
    loss = 0.25 * F.mse_loss(z, q.detach())
    if learning != "ema":
        loss = loss + 1.0 * F.mse_loss(z.detach(), q)
    quantized = _plain_rotation(z, q.detach()) if rotation_trick else z + (q - z).detach()
    (quantized.reshape(x.shape) * upstream).sum().add(loss).backward()

    torch.testing.assert_close(out.loss, loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.quantized, q.detach().reshape(x.shape), rtol=0, atol=0)
    torch.testing.assert_close(x.grad, x_plain.grad, rtol=1e-4, atol=1e-5)
    for name, value in params.items():
        if value.requires_grad:
            torch.testing.assert_close(getattr(quantizer.codebook, name).grad, value.grad, rtol=1e-4, atol=1e-6)


def test_the_rotation_trick_follows_its_formula_and_is_the_identity_on_its_code():
    x = torch.randn(200, 7, dtype=torch.float64, requires_grad=True)
    codes = torch.randn(200, 7, dtype=torch.float64)
    codes[:3] = -2.5 * x[:3].detach()  # opposite directions: x^ + q^ = 0, the rotation is a reflection
    grad = torch.randn(200, 7, dtype=torch.float64)
    out = _RotationTrick.apply(x, codes)
    assert torch.equal(out, codes), "forward returns the codes exactly"
    out.backward(grad)
    x_plain = x.detach().clone().requires_grad_()
    rotated = _plain_rotation(x_plain, codes)
    torch.testing.assert_close(rotated[3:], codes[3:], rtol=1e-10, atol=1e-10)  # R x is the code: the formula holds
    rotated.backward(grad)
    torch.testing.assert_close(x.grad[3:], x_plain.grad[3:], rtol=1e-10, atol=1e-10)
    # A rotation times |q| / |x|: the gradient's norm scales by that ratio alone, the opposite rows' included.
    ratio = codes.norm(dim=1) / x.detach().norm(dim=1)
    torch.testing.assert_close(x.grad.norm(dim=1), ratio * grad.norm(dim=1), rtol=1e-10, atol=1e-10)
    # On its own code the rotation is the identity: the straight-through gradient.
    same = x.detach().clone().requires_grad_()
    _RotationTrick.apply(same, same.detach().clone()).backward(grad)
    torch.testing.assert_close(same.grad, grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("rotation_trick", [False, True])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_simvq_matches_vector_quantize_pytorch_over_training_steps(rotation_trick, backend, device):
    peer = vqp.SimVQ(dim=D, codebook_size=K, rotation_trick=rotation_trick).to(device).train()
    ours = SimVQ(D, K, rotation_trick=rotation_trick, backend=backend).to(device).train()
    ours.load_vector_quantize_pytorch_state(peer.state_dict())
    peer_optimizer = torch.optim.SGD(peer.parameters(), lr=0.5)
    optimizer = torch.optim.SGD(ours.parameters(), lr=0.5)
    for _ in range(3):
        with torch.no_grad():  # rows near codes: no near-ties for the two searches to resolve differently
            x = peer.codebook[torch.randint(K, (2, 20), device=device)]
            x = x + 0.01 * x.std() * torch.randn_like(x)
        upstream = torch.randn_like(x)
        x_peer, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
        peer_quantized, peer_indices, peer_loss = peer(x_peer)
        quantized, indices, loss = ours(x_ours)
        assert torch.equal(indices, peer_indices)
        torch.testing.assert_close(quantized, peer_quantized, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(loss, peer_loss, rtol=1e-5, atol=1e-7)
        (peer_quantized * upstream).sum().add(peer_loss).backward()
        (quantized * upstream).sum().add(loss).backward()
        torch.testing.assert_close(x_ours.grad, x_peer.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ours.quantizer.codebook.map_weight.grad, peer.code_transform.weight.grad,
                                   rtol=1e-4, atol=1e-6)
        peer_optimizer.step(), optimizer.step()
        peer_optimizer.zero_grad(), optimizer.zero_grad()
    torch.testing.assert_close(ours.codebook, peer.codebook, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("learning", ["gradient", "simvq"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_dead_learned_codes_restart_on_batch_rows_and_their_parameters_follow(learning, backend, device):
    """Half the codes are sent far from the data: they starve, die and restart on rows of a batch; the next
    forward carries them into the parameters (the gradient codes' rows; SimVQ's base rows, through the map), so the
    codes searched are the parameters' codes, while backward after each forward never sees a changed tensor."""
    quantizer = _seeded(learning, backend, device, dead_code_threshold=0.5, decay=0.5, ema_warmup=False)
    with torch.no_grad():
        far = torch.arange(K, device=device) % 2 == 1
        if learning == "gradient":
            quantizer.codebook.weight[far] += 100.0
        else:  # base rows that the map sends 100 further along every axis
            shift = 100.0 * torch.ones(D, device=device) @ torch.linalg.pinv(quantizer.codebook.map_weight).T
            quantizer.codebook.base[far] += shift
    optimizer = torch.optim.Adam(quantizer.parameters(), lr=1e-3)
    for _ in range(8):
        x = torch.randn(64, D, device=device, requires_grad=True)
        out = quantizer(x)
        (out.quantized.square().mean() + out.loss).backward()
        optimizer.step()
        optimizer.zero_grad()
    quantizer.eval()
    with torch.no_grad():
        codes = quantizer.codebook.refresh_()
    assert not quantizer.codebook.rewritten.any()
    assert codes.norm(dim=1).max() < 10.0, "every far code restarted near the data"
    torch.testing.assert_close(quantizer.codebook.codes, codes, rtol=0, atol=0)
    params = {n: getattr(quantizer.codebook, n) for n in ("weight", "base", "map_weight") if hasattr(quantizer.codebook, n)}
    torch.testing.assert_close(_plain_codes(quantizer, params), codes, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("learning", ["gradient", "simvq"])
def test_learned_codebooks_compile_without_graph_breaks(learning):
    torch._dynamo.reset()
    quantizer = _seeded(learning, cosine=learning == "gradient", rotation_trick=True, dead_code_threshold=0.2)
    encoder = torch.nn.Linear(3, D)
    images = torch.randn(4, 5, 3)

    def step(images):
        out = quantizer(encoder(images))
        return out.quantized.square().mean() + out.loss, out.indices

    explanation = torch._dynamo.explain(step)(images)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    state = {k: v.clone() for k, v in quantizer.state_dict().items()}
    eager_loss, eager_indices = step(images)
    eager_loss.backward()
    eager_grads = [p.grad.clone() for p in quantizer.parameters()]
    quantizer.zero_grad()
    quantizer.load_state_dict(state)
    compiled_loss, compiled_indices = torch.compile(step, fullgraph=True)(images)
    compiled_loss.backward()
    assert torch.equal(compiled_indices, eager_indices)
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-6)
    for eager, compiled in zip(eager_grads, (p.grad for p in quantizer.parameters())):
        torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-6)


def _distributed_worker(rank, learning, init_file, out_dir):
    faulthandler.dump_traceback_later(300, exit=True)  # a hung rank fails the test instead of the CI run
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        torch.manual_seed(100 + rank)  # different batches and different random picks on each rank
        quantizer = VectorQuantizer(K, D, learning=learning, backend="torch", dead_code_threshold=1.0, decay=0.5,
                                    ema_warmup=False)
        model = torch.nn.parallel.DistributedDataParallel(quantizer)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        dead = 0
        for step in range(4):
            out = model(torch.randn(48, D) * (rank + 1) + 3 * step)  # a drifting cloud: codes die and restart
            (out.quantized.square().mean() + out.loss).backward()
            optimizer.step()
            optimizer.zero_grad()
            dead += int(out.dead_codes)
        torch.save({"state": quantizer.state_dict(), "dead": dead}, f"{out_dir}/rank{rank}.pt")
        # DDP's reducer must go while the group lives: freed after destroy_process_group it can hang a rank's exit.
        dist.barrier()
        del model, out
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("learning", ["gradient", "simvq"])
def test_two_processes_keep_one_learned_codebook(learning, tmp_path):
    """Gradients all-reduced by DDP, restarts drawn from both ranks' rows: every tensor of the state is equal."""
    mp.spawn(_distributed_worker, args=(learning, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    saved = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for key, value in saved[0]["state"].items():
        assert torch.equal(value, saved[1]["state"][key]), f"{key} differs between ranks"
    assert saved[0]["dead"] > 0, "the test should exercise restarts"


@pytest.mark.parametrize("learning", ["gradient", "simvq"])
def test_learned_codebooks_save_and_load(learning, tmp_path):
    quantizer = _seeded(learning, rotation_trick=True, codebook_weight=0.5)
    quantizer.save_pretrained(tmp_path)
    loaded = VectorQuantizer.from_pretrained(tmp_path)  # the earlier name is the same class
    assert loaded.options == quantizer.options
    for key, value in quantizer.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    x = torch.randn(2, 9, D)
    quantizer.eval(), loaded.eval()
    assert torch.equal(loaded(x).indices, quantizer(x).indices)


@pytest.mark.parametrize("learning", ["gradient", "simvq"])
def test_the_trainer_keeps_learned_codes_out_of_weight_decay(learning):
    from vqvae.config import Config  # noqa: PLC0415
    from vqvae.model import build_model  # noqa: PLC0415
    from vqvae.train import make_optimizer  # noqa: PLC0415

    cfg = Config()
    cfg.model.hidden_channels, cfg.model.residual_layers, cfg.model.residual_hidden = 8, 1, 4
    cfg.model.embedding_dim, cfg.quantizer.num_codes, cfg.quantizer.learning = 8, 16, learning
    cfg.quantizer.affine_reparam, cfg.optim.weight_decay = None, 0.1
    model = build_model(cfg)
    decayed = {id(p) for group in make_optimizer(model, cfg).param_groups if group["weight_decay"] > 0
               for p in group["params"]}
    learned = [p for name, p in model.named_parameters() if ".codebook." in name]
    assert learned and not any(id(p) in decayed for p in learned)
    assert any(id(p) in decayed for p in model.encoder.parameters()), "the conv weights are still decayed"
