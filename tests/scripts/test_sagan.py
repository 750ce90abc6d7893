"""SAGAN: positional codes, generator/discriminator, WGAN-GP losses and the MONAI training step."""

from __future__ import annotations

import types

import pytest
import torch
from monai.engines import SupervisedTrainer

from scripts.robust import NonFiniteError
from scripts.sagan import (
    SAGANDiscriminator,
    SAGANGenerator,
    SAGANTrainStep,
    critic_loss_terms,
    generator_loss_terms,
    gradient_penalty,
    n_code_bits,
    positional_codes,
)

TINY_G = dict(base_channels=8, n_res_blocks=1)
TINY_D = dict(base_channels=8, n_layers=3)


def _batch(b=2, size=32, seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.rand(b, 1, size, size, generator=g) for k in ("image", "synthetic", "unlabelled")}


def _engine(gen: torch.nn.Module):
    return types.SimpleNamespace(
        state=types.SimpleNamespace(device=torch.device("cpu")), network=gen,
        optimizer=torch.optim.Adam(gen.parameters(), lr=1e-3), non_blocking=False, optim_set_to_none=True,
    )


def _snapshot(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def _changed(module: torch.nn.Module, before: list[torch.Tensor]) -> bool:
    return any(not torch.equal(p, q) for p, q in zip(module.parameters(), before))


# -- positional condition encoding ------------------------------------------------------------------------


@pytest.mark.parametrize("n, bits", [(1, 1), (2, 3), (3, 5), (4, 5)])
def test_code_bits_and_shape(n, bits):
    assert n_code_bits(n) == bits
    codes = positional_codes(n, 12, 20)
    assert codes.shape == (bits, 12, 20) and codes.dtype == torch.float32
    assert set(codes.unique().tolist()) <= {0.0, 1.0}


def test_codes_windows_constant_distinct_msb_first():
    codes = positional_codes(2, 8, 8)
    windows = [codes[:, r : r + 4, c : c + 4] for r in (0, 4) for c in (0, 4)]  # row-major
    for w in windows:
        assert torch.equal(w, w[:, :1, :1].expand_as(w))  # constant over the window
    vectors = [tuple(w[:, 0, 0].tolist()) for w in windows]
    assert vectors == [(0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1)]  # index k in binary, MSB first
    assert torch.equal(positional_codes(1, 5, 5), torch.zeros(1, 5, 5))


def test_codes_non_divisible_size():
    codes = positional_codes(2, 5, 7, dtype=torch.float64)
    assert codes.shape == (3, 5, 7) and codes.dtype == torch.float64
    index = codes[0] * 4 + codes[1] * 2 + codes[2]
    rows, cols = torch.arange(5) * 2 // 5, torch.arange(7) * 2 // 7  # floor(row * N / height)
    torch.testing.assert_close(index, (rows[:, None] * 2 + cols[None, :]).double())
    assert len(positional_codes(3, 10, 11).flatten(1).unique(dim=1).T) == 9  # 9 distinct windows


# -- generator ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gen():
    torch.manual_seed(0)
    return SAGANGenerator(**TINY_G)


@pytest.mark.parametrize("shape", [(1, 1, 64, 64), (2, 1, 128, 128), (1, 1, 32, 48)])
def test_generator_shape_and_range(gen, shape):
    with torch.no_grad():
        y = gen.eval()(torch.rand(shape))
    assert y.shape == shape and y.min() >= 0 and y.max() <= 1


def test_generator_gating_train_vs_eval(gen):
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        a, b = gen.train()(x), gen(x)
        e1, e2 = gen.eval()(x), gen(x)
    assert not torch.equal(a, b)  # Bernoulli gate (Eq. 1) is random in training
    assert torch.equal(e1, e2)  # delta = 1 at eval
    torch.manual_seed(1)
    ungated = SAGANGenerator(**TINY_G, gate_prob=1.0)
    with torch.no_grad():
        torch.testing.assert_close(ungated.train()(x), ungated.eval()(x), rtol=0, atol=0)
    with pytest.raises(ValueError):
        SAGANGenerator(gate_prob=1.5)


def test_generator_gate_zero_passes_input_through():
    net = SAGANGenerator(**TINY_G, gate_prob=0.0).train()  # delta = 0: x' = tanh(2 x_s) (Eq. 1-2)
    x = torch.rand(1, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(net(x), (torch.tanh(2 * (2 * x - 1)) + 1) / 2)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # raised inside torch's InstanceNorm
def test_generator_torchscript_script_and_trace(gen):
    gen.eval()
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        ref = gen(x)
        scripted, traced = torch.jit.script(gen), torch.jit.trace(gen, x)
        torch.testing.assert_close(scripted(x), ref, rtol=0, atol=1e-5)
        torch.testing.assert_close(traced(x), ref, rtol=0, atol=1e-5)
        y = torch.rand(1, 1, 128, 96)  # the trace is not tied to the example size
        torch.testing.assert_close(traced(y), gen(y), rtol=0, atol=1e-5)


# -- discriminator and losses ------------------------------------------------------------------------------


def test_discriminator_output():
    d = SAGANDiscriminator(base_channels=4)  # 6 layers: 64 px -> 1x1 patch map
    assert d(torch.rand(3, 1, 64, 64)).shape == (3,)
    convs = [m for m in d.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [4, 8, 16, 32, 64, 128, 1]
    capped = SAGANDiscriminator(base_channels=4, n_layers=3, max_channels=8)
    assert [m.out_channels for m in capped.modules() if isinstance(m, torch.nn.Conv2d)] == [4, 8, 8, 1]


def test_critic_init_keeps_the_input_gradient_alive():
    """He init gives the critic an input gradient ~500x larger than PyTorch's default at 64 px, so the gradient
    penalty can act from the first updates (default: ||grad|| ~ 3e-4, the penalty stuck at ~1)."""
    torch.manual_seed(0)
    x = torch.rand(4, 1, 64, 64, requires_grad=True)
    norms = {}
    for init in ("kaiming", "torch"):
        (g,) = torch.autograd.grad(SAGANDiscriminator(base_channels=8, init=init)(x).sum(), x)
        norms[init] = g.flatten(1).norm(dim=1).mean().item()
    assert norms["kaiming"] > 0.05 and norms["torch"] < 5e-3 and norms["kaiming"] > 50 * norms["torch"]
    with pytest.raises(ValueError, match="critic_init"):
        SAGANDiscriminator(init="xavier")


class LinearCritic(torch.nn.Module):
    def __init__(self, shape, scale: float):
        super().__init__()
        w = torch.randn(shape)
        self.w = torch.nn.Parameter(scale * w / w.norm())

    def forward(self, x):
        return (self.w * x).flatten(1).sum(1)


class QuadraticCritic(torch.nn.Module):
    def forward(self, x):  # grad = x, so ||grad|| is the norm of the point where it is evaluated
        return 0.5 * x.flatten(1).pow(2).sum(1)


def test_gradient_penalty_linear_critic():
    real, fake = torch.rand(4, 1, 8, 8), torch.rand(4, 1, 8, 8)
    assert gradient_penalty(LinearCritic((1, 8, 8), 1.0), real, fake) < 1e-10  # 1-Lipschitz, unit gradient
    steep = LinearCritic((1, 8, 8), 3.0)
    gp = gradient_penalty(steep, real, fake)
    torch.testing.assert_close(gp, torch.tensor(4.0))  # (3 - 1)^2
    gp.backward()  # create_graph=True: the penalty trains the critic
    assert steep.w.grad is not None and steep.w.grad.abs().sum() > 0
    with pytest.raises(ValueError):
        gradient_penalty(steep, real, fake[:2])


def test_gradient_penalty_on_interpolates():
    u = torch.randn(4, 1, 8, 8)
    u = u / u.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    real, fake = 3 * u, 1 * u  # at xhat = eps real + (1 - eps) fake, ||grad|| = 1 + 2 eps
    torch.manual_seed(5)
    gp = gradient_penalty(QuadraticCritic(), real, fake)
    torch.manual_seed(5)
    eps = torch.rand(4, 1, 1, 1)
    torch.testing.assert_close(gp, (2 * eps).pow(2).mean())
    assert 0 < gp < 4  # neither at fake (0) nor at real (4)


def test_every_loss_term_sends_gradient():
    torch.manual_seed(0)
    g, d = SAGANGenerator(**TINY_G).train(), SAGANDiscriminator(**TINY_D)
    b = _batch()
    terms, out_n = generator_loss_terms(g, d, b["image"], b["synthetic"], b["unlabelled"])
    assert out_n.shape == b["image"].shape
    torch.testing.assert_close(terms["loss"], terms["g_adv"] + terms["g_id"] + terms["g_rec"])
    params = list(g.parameters())
    for key in ("g_adv", "g_id", "g_rec"):
        grads = torch.autograd.grad(terms[key], params, retain_graph=True, allow_unused=True)
        assert sum(float(gr.abs().sum()) for gr in grads if gr is not None) > 0, key
    with torch.no_grad():
        fake = g(b["unlabelled"])
    d_terms = critic_loss_terms(d, b["image"], fake)
    assert set(d_terms) == {"d_loss", "d_wasserstein", "gp"}
    weights = [m.weight for m in d.modules() if isinstance(m, torch.nn.Conv2d)]  # the last bias cancels out
    grads = torch.autograd.grad(d_terms["d_loss"], weights)
    assert all(gr.abs().sum() > 0 for gr in grads)


# -- training step -----------------------------------------------------------------------------------------


def _step(n_critic=2):
    torch.manual_seed(0)
    g, d = SAGANGenerator(**TINY_G), SAGANDiscriminator(**TINY_D)
    d_opt = torch.optim.Adam(d.parameters(), lr=1e-3)
    calls = []
    step = d_opt.step
    d_opt.step = lambda *a, **k: (calls.append(1), step(*a, **k))[1]
    return g, d, SAGANTrainStep(d, d_opt, n_critic=n_critic), calls


def test_train_step_updates_both_networks():
    g, d, train_step, calls = _step(n_critic=3)
    engine = _engine(g)
    g_before, d_before = _snapshot(g), _snapshot(d)
    out = train_step(engine, _batch())
    assert len(calls) == 3  # n_critic critic updates per generator update
    assert _changed(g, g_before) and _changed(d, d_before)
    assert set(out["terms"]) == {"loss", "g_adv", "g_id", "g_rec", "d_loss", "d_wasserstein", "gp"}
    assert all(isinstance(v, float) and torch.isfinite(torch.tensor(v)) for v in out["terms"].values())
    assert out["pred"].shape == out["label"].shape and not out["pred"].requires_grad
    assert float(out["loss"]) == pytest.approx(out["terms"]["loss"])
    assert all(p.requires_grad for p in d.parameters())  # restored after the generator update
    assert g.training and d.training


def test_generator_step_leaves_critic_grads_alone():
    g, d, train_step, _ = _step()
    b = _batch()
    for p in d.parameters():
        p.grad = torch.zeros_like(p)
    train_step.generator_step(_engine(g), b["image"], b["synthetic"], b["unlabelled"])
    assert all(p.grad.abs().sum() == 0 for p in d.parameters())
    assert any(p.grad is not None for p in g.parameters())


def test_train_step_non_finite_critic_term_raises_before_the_weights_change():
    g, d, train_step, calls = _step()
    train_step.lambda_gp = float("nan")
    engine = _engine(g)
    engine.state.epoch, engine.state.iteration = 3, 7
    g_before, d_before = _snapshot(g), _snapshot(d)
    with pytest.raises(NonFiniteError, match=r"critic loss at epoch 3, iteration 7 \(d_loss=nan.*learning rate 0.001"):
        train_step(engine, _batch())
    assert not calls  # the critic's optimiser did not step
    assert not _changed(g, g_before) and not _changed(d, d_before)


def test_generator_step_non_finite_term_raises_before_the_weights_change():
    g, d, train_step, _ = _step()
    train_step.lambda_rec = float("nan")
    engine = _engine(g)
    engine.state.epoch, engine.state.iteration = 3, 7
    g_before, d_before = _snapshot(g), _snapshot(d)
    b = _batch()
    with pytest.raises(NonFiniteError, match=r"loss at epoch 3, iteration 7 \(loss=nan.*learning rate 0.001"):
        train_step.generator_step(engine, b["image"], b["synthetic"], b["unlabelled"])
    assert not _changed(g, g_before) and not _changed(d, d_before)
    assert all(p.requires_grad for p in d.parameters())  # the critic is unfrozen again


def test_train_step_missing_key():
    g, _, train_step, _ = _step()
    batch = _batch()
    del batch["unlabelled"]
    with pytest.raises(KeyError, match="unlabelled"):
        train_step(_engine(g), batch)


def test_supervised_trainer_integration():
    torch.manual_seed(0)
    g, d = SAGANGenerator(**TINY_G), SAGANDiscriminator(**TINY_D)
    items = [{k: v[0] for k, v in _batch(b=1, seed=i).items()} for i in range(4)]
    loader = torch.utils.data.DataLoader(items, batch_size=2)
    trainer = SupervisedTrainer(
        device=torch.device("cpu"), max_epochs=1, train_data_loader=loader, network=g,
        optimizer=torch.optim.Adam(g.parameters(), lr=5e-5, betas=(0.5, 0.999)), loss_function=None,
        iteration_update=SAGANTrainStep(d, torch.optim.Adam(d.parameters(), lr=5e-5, betas=(0.5, 0.999))),
        decollate=False,  # loss_function=None: the step computes its own losses
    )
    trainer.run()
    assert trainer.state.iteration == 2
    assert set(trainer.state.output["terms"]) >= {"loss", "d_loss", "gp"}
