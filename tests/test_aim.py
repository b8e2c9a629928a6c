"""AIM (seed 000): the formulas against hand-computed values, the decoupler's gradient path
(Eq. 13), what the mask learns, Algorithm 1's phases, checkpoint/resume, every fusion, three
modalities and the decoupler's size."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from tunebal.data import build_dataset
from tunebal.engine import Engine
from tunebal.methods.aim import AIM, BlockDecoupler, Decoupler, num_decoupler_parameters, run_block
from tunebal.methods.aim.losses import (
    depth_loss,
    distance_logits,
    euclidean_distance,
    imbalance,
    interaction_weights,
    modulation_loss,
    performance_and_loss,
    reconstruction_loss,
)
from tunebal.methods.aim.prototypes import PointwiseDecoder
from tunebal.models.encoders import mlp_encoder, resnet18_encoder, small_conv_encoder

SMALL = {"n_train": 48, "n_val": 16, "n_test": 16}
COMMON = {"batch_size": 16, "lr": 0.05}
FAST = {**COMMON, "proto_steps": 3}


@pytest.fixture(scope="module")
def small_data(_isolated_cache):
    return build_dataset("synth", SMALL)


@pytest.fixture(scope="module")
def three_data(_isolated_cache):
    return build_dataset("synth", {**SMALL, "modalities": 3, "frames": 2})  # clips of T = 2 frames


def _tree_equal(a, b, path="") -> None:
    if isinstance(a, dict):  # OrderedDict and dict alike
        assert isinstance(b, dict), path
    else:
        assert type(a) is type(b), path
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a, b), f"{path} differs"
    elif isinstance(a, dict):
        assert list(a) == list(b), path
        for k in a:
            _tree_equal(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _tree_equal(x, y, f"{path}/{i}")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


# --------------------------------------------------------------------------- formulas


def test_eq9_eq10_performance_and_loss_by_hand():
    feats = torch.tensor([[0.0, 0.0], [3.0, 4.0], [1.0, 1.0]])
    protos = torch.tensor([[0.0, 0.0], [3.0, 0.0]])
    labels = torch.tensor([0, 1, 1])
    logits = distance_logits(feats, protos)
    # Euclidean distances: row 0 -> (0, 3); row 1 -> (5, 4); row 2 -> (sqrt 2, sqrt 5)
    expected = -torch.tensor([[0.0, 3.0], [5.0, 4.0], [math.sqrt(2), math.sqrt(5)]])
    assert torch.allclose(logits, expected, atol=1e-6)
    p = [1 / (1 + math.exp(-3)), 1 / (1 + math.exp(-1)), 1 / (1 + math.exp(math.sqrt(5) - math.sqrt(2)))]
    s, loss = performance_and_loss(logits, labels)
    assert float(s) == pytest.approx(sum(p) / 3, abs=1e-6)
    assert float(loss) == pytest.approx(-sum(math.log(v) for v in p) / 3, abs=1e-6)
    # the rms variant divides δ by sqrt(dim), the temperature divides the logits
    assert torch.allclose(distance_logits(feats, protos, "rms", 2.0), expected / math.sqrt(2) / 2.0, atol=1e-6)


def test_distance_gradient_matches_autograd_of_the_difference_norm():
    """The hand-written backward of δ equals autograd through ||x_i − p_k|| built elementwise."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(7, 300, generator=gen)
    p = torch.randn(4, 300, generator=gen)
    p[2] = x[5]  # δ = 0: cdist's convention, zero gradient (not NaN)
    weights = torch.randn(7, 4, generator=gen)
    xa, pa = x.clone().requires_grad_(), p.clone().requires_grad_()
    (euclidean_distance(xa, pa) * weights).sum().backward()
    xb, pb = x.clone().requires_grad_(), p.clone().requires_grad_()
    diff = xb.unsqueeze(1) - pb.unsqueeze(0)
    ref = torch.where(diff.abs().sum(2) > 0, diff.pow(2).sum(2).clamp_min(1e-30).sqrt(), torch.zeros(7, 4))
    (ref * weights).sum().backward()
    assert torch.allclose(euclidean_distance(x, p), ref.detach(), atol=1e-4)
    assert torch.allclose(xa.grad, xb.grad, atol=1e-4)
    assert torch.allclose(pa.grad, pb.grad, atol=1e-4)
    assert torch.isfinite(xa.grad).all() and float(xa.grad[5].abs().sum()) > 0


def test_eq12_interaction_weights_by_hand():
    s = torch.tensor([0.8, 0.2])
    s_aux = torch.tensor([0.5, 0.1])
    rho, rho_aux = interaction_weights(s, s_aux)
    denom = math.exp(-0.8) + math.exp(-0.2) + math.exp(-0.5) + math.exp(-0.1)
    assert rho.tolist() == pytest.approx([math.exp(-0.8) / denom, math.exp(-0.2) / denom], abs=1e-6)
    assert rho_aux.tolist() == pytest.approx([math.exp(-0.5) / denom, math.exp(-0.1) / denom], abs=1e-6)
    assert float(rho.sum() + rho_aux.sum()) == pytest.approx(1.0, abs=1e-6)
    assert rho[1] > rho[0]  # the weaker modality's block gets the larger weight
    rho_only, none = interaction_weights(s, None)  # w/o PAM: originals only
    assert none is None
    d2 = math.exp(-0.8) + math.exp(-0.2)
    assert rho_only.tolist() == pytest.approx([math.exp(-0.8) / d2, math.exp(-0.2) / d2], abs=1e-6)


def test_eq11_eq14_eq15_by_hand():
    # Eq. 14: population std over modalities / mean
    assert float(imbalance(torch.tensor([0.2, 0.6]))) == pytest.approx(0.2 / 0.4, abs=1e-6)
    s3 = torch.tensor([0.1, 0.4, 0.7])
    std = math.sqrt(((0.1 - 0.4) ** 2 + 0 + (0.7 - 0.4) ** 2) / 3)
    assert float(imbalance(s3)) == pytest.approx(std / 0.4, abs=1e-6)
    assert float(imbalance(torch.tensor([0.5, 0.5]))) == 0.0
    # Eq. 11
    losses, losses_aux = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])
    rho, rho_aux = torch.tensor([0.1, 0.2]), torch.tensor([0.3, 0.4])
    assert float(depth_loss(losses, rho, losses_aux, rho_aux)) == pytest.approx(0.1 + 0.4 + 0.9 + 1.6)
    assert float(depth_loss(losses, rho)) == pytest.approx(0.5)
    # Eq. 15
    assert float(modulation_loss(torch.tensor([0.5, 2.0]), torch.tensor([4.0, 1.0]))) == pytest.approx(4.0)


def test_eq4_reconstruction_loss_by_hand():
    decoded = {"a": torch.tensor([[1.0, 2.0], [0.0, 0.0]]), "b": torch.tensor([[[1.0]], [[3.0]]])}
    means = {"a": torch.tensor([[0.0, 0.0], [1.0, 1.0]]), "b": torch.tensor([[[0.0]], [[1.0]]])}
    # Σ||·||²_F = (1 + 4) + (1 + 1) + 1 + 4 = 12 over M·K = 4
    assert float(reconstruction_loss(decoded, means)) == pytest.approx(3.0)


def test_pointwise_decoder_is_identity_at_init_and_mixes_channels():
    frames = torch.randn(2, 3, 3, 4, 4)  # (K, T, C, H, W)
    dec = PointwiseDecoder("frames", (3, 3, 4, 4))
    assert torch.equal(dec(frames), frames)
    with torch.no_grad():
        dec.map.weight.copy_(torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 2.0]]))
    out = dec(frames)
    assert torch.equal(out[:, :, 0], frames[:, :, 1]) and torch.equal(out[:, :, 2], 2 * frames[:, :, 2])


def test_prototypes_propagate_in_eval_mode_and_train_only_themselves(small_data):
    eng = Engine(small_data, "aim", {**FAST, "epochs": 1}, device="cpu")
    dap, model = eng.method.dap, eng.model
    model.train()
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    depths, feats = dap.propagate(model)
    assert model.training and all(mod.training for mod in model.modules())  # mode restored
    assert all(p.requires_grad for p in model.parameters())  # flags restored
    _tree_equal(buffers, model.state_dict())  # no running-statistics update
    assert [tuple(t.shape) for t in depths["visual"]][0][0] == small_data.num_classes  # (K·T, C, H, W), T = 1
    model.eval()  # Eq. 6: P_d = E_{<=d}(P_0) with the network as used at inference
    with torch.no_grad():
        h = model.encoders["audio"].prepare(dap.protos["audio"])
        for d, block in enumerate(model.encoders["audio"].blocks):
            h = block(h)
            assert torch.allclose(h, depths["audio"][d])
    model.train()
    loss = sum(t.sum() for m in depths for t in depths[m]) + dap.classification_loss(model, feats)[0]
    loss.backward()
    assert all(p.grad is None for p in model.parameters())  # the framework is frozen on this path
    assert all(dap.protos[m].grad.abs().sum() > 0 for m in small_data.modalities)


# --------------------------------------------------------------------------- decoupler


def _conv_block() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=True), nn.BatchNorm2d(8), nn.ReLU())


def test_decoupler_init_reconstructs_and_starts_symmetric():
    block = _conv_block()
    dec = BlockDecoupler(block, latent_dim=64)  # capped at min(64, 3·3·3 + 1, 8) = 8 = full rank
    assert dec.names == [("0.weight", "0.bias")] and dec.layers[0].latent == 8
    out = dec.decouple(block, ("aux", "comp"), detach_theta=True)
    assert float(out.rec.detach()) < 1e-8  # PCA init: Ψ(Φ_lat(θ)) = θ at full rank
    assert float(out.mask_mean) == pytest.approx(0.5)
    aux, comp = out.params["aux"], out.params["comp"]
    assert torch.allclose(aux["0.weight"], 0.5 * block[0].weight, atol=1e-5)
    assert torch.allclose(aux["0.weight"], comp["0.weight"]) and torch.allclose(aux["0.bias"], comp["0.bias"])
    # a smaller latent is lossy, and the parameter count matches the formula
    small = BlockDecoupler(block, latent_dim=3)
    assert float(small.decouple(block, ("aux",), detach_theta=True).rec.detach()) > 1e-3
    assert sum(p.numel() for p in small.parameters()) == num_decoupler_parameters(block, 3) == 2 * 28 * 3 + 9 + 3 + 3 + 28


def test_eq13_auxiliary_loss_reaches_original_parameters():
    block = _conv_block()
    dec = BlockDecoupler(block, latent_dim=4)
    x = torch.randn(6, 3, 5, 5)
    running = block[1].running_mean.clone()
    out = dec.decouple(block, ("aux",), detach_theta=False)
    y = run_block(block, out.params["aux"], x)
    y.pow(2).mean().backward()
    assert block[0].weight.grad is not None and block[0].weight.grad.abs().sum() > 0
    assert block[0].bias.grad is not None and block[0].bias.grad.abs().sum() > 0
    assert block[1].weight.grad.abs().sum() > 0  # BN affine is shared
    assert torch.equal(block[1].running_mean, running)  # the decoupled block never touches running stats
    # with θ detached (L_pam) only the decoupler learns
    block.zero_grad(set_to_none=True)
    dec.zero_grad(set_to_none=True)
    out = dec.decouple(block, ("comp",), detach_theta=True)
    run_block(block, out.params["comp"], x).pow(2).mean().backward()
    assert block[0].weight.grad is None
    assert dec.layers[0].mask.weight.grad.abs().sum() > 0


def test_complement_learns_to_outperform_auxiliary_on_toy_problem():
    """Eq. 8 trains the complement θ^a against the DAP; the mask then puts the useful latent
    directions in 1 − w, so the auxiliary block θ^b holds the under-performing ones (Fig. 5a)."""
    torch.manual_seed(0)
    k, n_in, b = 4, 20, 128
    gen = torch.Generator().manual_seed(1)
    mu = torch.randn(k, n_in, generator=gen)

    def batch():
        y = torch.randint(0, k, (b,), generator=gen)
        return mu[y] + 1.5 * torch.randn(b, n_in, generator=gen), y

    block = nn.Sequential(nn.Linear(n_in, 32, bias=False), nn.BatchNorm1d(32), nn.ReLU())
    protos = torch.randn(k, 32, generator=gen).abs()
    opt = torch.optim.SGD(block.parameters(), lr=0.05, momentum=0.9)
    for _ in range(100):  # a block trained towards the prototypes
        x, y = batch()
        loss = performance_and_loss(distance_logits(block(x), protos), y)[1]
        opt.zero_grad()
        loss.backward()
        opt.step()
    dec = BlockDecoupler(block, latent_dim=32)
    dopt = torch.optim.Adam(dec.parameters(), lr=0.05)
    s_comp, s_aux = [], []
    for step in range(200):
        x, y = batch()
        out = dec.decouple(block, ("aux", "comp"), detach_theta=True)
        sa, l_a = performance_and_loss(distance_logits(run_block(block, out.params["comp"], x), protos), y)
        with torch.no_grad():
            sb, _ = performance_and_loss(distance_logits(run_block(block, out.params["aux"], x), protos), y)
        dopt.zero_grad()
        (l_a + out.rec).backward()
        dopt.step()
        if step >= 150:
            s_comp.append(float(sa.detach()))
            s_aux.append(float(sb))
    comp, aux = sum(s_comp) / len(s_comp), sum(s_aux) / len(s_aux)
    assert comp > 0.7
    assert comp - aux > 0.15, (comp, aux)


@pytest.mark.parametrize(
    "name, encoder",
    [
        ("small audio", lambda: small_conv_encoder("spectrogram", 1, (16, 32, 64, 128))),
        ("small visual", lambda: small_conv_encoder("frames", 3, (16, 32, 64, 128))),
        ("mlp text", lambda: mlp_encoder(32, (64, 64, 128, 128))),
        ("resnet18 spectrogram", lambda: resnet18_encoder("spectrogram", 1)),
        ("resnet18 frames", lambda: resnet18_encoder("frames", 3)),
    ],
)
def test_decoupler_is_smaller_than_the_encoder(name, encoder):
    enc = encoder()
    n_enc = sum(p.numel() for p in enc.parameters())
    default = AIM.KNOBS.get("latent_dim").default
    for latent in (default, 32):  # the default and the search space's largest value
        n_dec = sum(num_decoupler_parameters(block, latent) for block in enc.blocks)
        assert 0 < n_dec < n_enc, (name, latent, n_dec, n_enc)
    if "small" in name:  # the formula matches the built module
        built = Decoupler({"m": enc}, default)
        assert built.num_parameters() == sum(num_decoupler_parameters(b, default) for b in enc.blocks)


# --------------------------------------------------------------------------- Algorithm 1


def test_phases_before_and_after_start_epoch(small_data):
    cfg = {**COMMON, "epochs": 2, "seed": 3}
    base = Engine(small_data, "baseline", cfg, device="cpu")
    aim = Engine(small_data, "aim", {**cfg, "start_epoch": 1, "proto_steps": 3}, device="cpu")
    method: AIM = aim.method  # type: ignore[assignment]
    assert not method.dap_fitted
    protos0 = {m: p.detach().clone() for m, p in method.dap.protos.items()}
    dec0 = {k: v.clone() for k, v in method.decoupler.state_dict().items()}

    # epoch 0 < E: CE only for the framework; DAP fitted (before the epoch and after it)
    base.run_epoch()
    metrics = aim.run_epoch()
    assert method.dap_fitted
    assert metrics["method/phase"] == 0.0 and "method/loss/mod" not in metrics
    assert "method/loss/pam" in metrics and "method/dap_fit/cls_loss" in metrics
    _tree_equal(base.model.state_dict(), aim.model.state_dict())  # bit-identical to joint training
    assert any(not torch.equal(protos0[m], method.dap.protos[m]) for m in protos0)
    assert any(not torch.equal(dec0[k], v) for k, v in method.decoupler.state_dict().items())

    # the DAP fit on its own: framework parameters and buffers bit-unchanged, prototypes moved
    before = {k: v.clone() for k, v in aim.model.state_dict().items()}
    aim.optimizer.zero_grad(set_to_none=True)  # the last training step's gradients
    protos1 = {m: p.detach().clone() for m, p in method.dap.protos.items()}
    method.fit_dap(aim, 3)
    _tree_equal(before, aim.model.state_dict())
    assert all(p.grad is None for p in aim.model.parameters())
    assert all(not torch.equal(protos1[m], method.dap.protos[m]) for m in protos1)

    # epoch 1 >= E: the modulation loss is active and changes the framework's trajectory;
    # Algorithm 1 line 10 updates the framework and the DAP only: the decoupler stays put
    dec1 = {k: v.clone() for k, v in method.decoupler.state_dict().items()}
    base.run_epoch()
    metrics = aim.run_epoch()
    assert metrics["method/phase"] == 1.0 and metrics["method/loss/mod"] > 0
    assert "method/loss/pam" not in metrics
    _tree_equal(dec1, method.decoupler.state_dict())
    for key in ("alpha/d1", "alpha/d4", "s/audio/d1", "s_aux/visual/d4", "rho/audio/d2", "rho_aux/visual/d3", "mask_mean"):
        assert f"method/{key}" in metrics, key
    rho_total = sum(metrics[f"method/{r}/{m}/d2"] for r in ("rho", "rho_aux") for m in small_data.modalities)
    assert rho_total == pytest.approx(1.0, abs=1e-5)
    assert any(not torch.equal(a, b) for a, b in zip(base.model.state_dict().values(), aim.model.state_dict().values()))


def test_pam_after_start_keeps_training_the_decoupler(small_data):
    eng = Engine(small_data, "aim", {**COMMON, "epochs": 1, "seed": 3, "start_epoch": 0, "proto_steps": 2, "pam_after_start": True}, device="cpu")
    method: AIM = eng.method  # type: ignore[assignment]
    dec0 = {k: v.clone() for k, v in method.decoupler.state_dict().items()}
    metrics = eng.run_epoch()
    assert metrics["method/phase"] == 1.0 and metrics["method/loss/pam"] > 0 and metrics["method/loss/mod"] > 0
    assert any(not torch.equal(dec0[k], v) for k, v in method.decoupler.state_dict().items())


def test_modulation_loss_follows_the_formulas(small_data):
    """One step from E = 0: loss/mod equals Σ_d α_d L_d recomputed from the logged s, ρ, L."""
    eng = Engine(small_data, "aim", {**FAST, "epochs": 1, "start_epoch": 0, "pam": False}, device="cpu")
    method: AIM = eng.method  # type: ignore[assignment]
    method.on_epoch_start(eng)
    inputs, labels = next(eng.iterate(small_data.train, shuffle=True))
    model = eng.model
    model.train()
    with torch.no_grad():  # the same quantities by hand, before the step changes anything
        # the step's own forward updates BN running statistics before the prototypes propagate
        # (eval mode), so propagate them through a copy that has seen this batch in train mode
        ref = copy.deepcopy(model)
        ref.train()
        ref.encode(inputs)
        protos, _ = method.dap.propagate(ref)
        h = {m: model.encoders[m].prepare(inputs[m]) for m in small_data.modalities}
        s = torch.zeros(2, 4)
        losses = torch.zeros(2, 4)
        for i, m in enumerate(small_data.modalities):
            x = h[m]
            for d, block in enumerate(model.encoders[m].blocks):
                x = run_block(block, {}, x)  # train-mode statistics, running stats untouched
                lg = distance_logits(x.reshape(len(labels), -1), protos[m][d].reshape(small_data.num_classes, -1))
                s[i, d], losses[i, d] = performance_and_loss(lg, labels)
        expected = sum(
            float(imbalance(s[:, d])) * float(depth_loss(losses[:, d], interaction_weights(s[:, d], None)[0])) for d in range(4)
        )
    method.epoch_means.reset()
    eng.train_step(inputs, labels)
    assert method.metrics()["loss/mod"] == pytest.approx(expected, rel=1e-4)


def test_checkpoint_round_trip_and_bit_exact_resume(small_data, tmp_path):
    cfg = {**FAST, "epochs": 2, "start_epoch": 1, "seed": 1}
    straight = Engine(small_data, "aim", cfg, device="cpu")
    straight.run_epoch()
    path = tmp_path / "aim.arrow"
    straight.save(str(path))
    state_at_1 = copy.deepcopy(straight.method.state_dict())
    for key in ("rng", "dap_fitted", "decoupler", "decoupler_opt", "dap", "proto_opt"):
        assert key in state_at_1, key
    straight.run_epoch()

    resumed = Engine(small_data, "aim", cfg, device="cpu")
    resumed.load(str(path))
    _tree_equal(state_at_1, resumed.method.state_dict())  # round trip of every piece of AIM state
    assert resumed.epoch == 1 and resumed.method.dap_fitted
    resumed.run_epoch()  # crosses the phase boundary: epoch 1 = E
    _tree_equal(straight.model.state_dict(), resumed.model.state_dict())
    _tree_equal(straight.method.state_dict(), resumed.method.state_dict())
    _tree_equal(straight.optimizer.state_dict(), resumed.optimizer.state_dict())


@pytest.mark.parametrize("fusion", ["concat", "sum", "film", "gated"])
def test_trains_with_every_fusion(small_data, fusion):
    eng = Engine(small_data, "aim", {**FAST, "epochs": 1, "start_epoch": 0, "fusion": fusion}, device="cpu")
    before = [p.detach().clone() for p in eng.model.parameters()]
    metrics = eng.run_epoch()
    assert math.isfinite(metrics["train/loss"]) and metrics["method/loss/mod"] > 0
    assert all(math.isfinite(v) for k, v in metrics.items() if k.startswith("method/"))
    assert any(not torch.equal(a, b) for a, b in zip(before, eng.model.parameters()))


def test_three_modalities_and_ablations(three_data):
    base = {**FAST, "epochs": 1, "start_epoch": 0}
    eng = Engine(three_data, "aim", {**base, "fusion": "gated"}, device="cpu")
    metrics = eng.run_epoch()
    assert math.isfinite(metrics["train/loss"])
    assert {"method/s/text/d4", "method/s_aux/text/d1", "method/rho_aux/text/d2"} <= set(metrics)
    assert eng.method.dap.protos["visual"].shape == (three_data.num_classes, 2, 3, 32, 32)
    assert sum(metrics[f"method/{r}/{m}/d1"] for r in ("rho", "rho_aux") for m in three_data.modalities) == pytest.approx(1.0, abs=1e-5)

    no_pam = Engine(three_data, "aim", {**base, "pam": False}, device="cpu")
    m = no_pam.run_epoch()
    assert no_pam.method.decoupler is None and "method/s_aux/text/d1" not in m and "method/loss/pam" not in m
    assert sum(m[f"method/rho/{x}/d1"] for x in three_data.modalities) == pytest.approx(1.0, abs=1e-5)

    label = Engine(three_data, "aim", {**base, "target": "label"}, device="cpu")
    m = label.run_epoch()
    assert label.method.dap is None and "method/dap_fit/cls_loss" not in m and m["method/loss/mod"] > 0
    # a label target cannot tell depths apart for the original blocks (interpretation 9)
    assert m["method/s/audio/d1"] == pytest.approx(m["method/s/audio/d4"])


def test_without_dam_alpha_is_one(small_data):
    eng = Engine(small_data, "aim", {**FAST, "epochs": 1, "start_epoch": 0, "dam": False, "pam": False}, device="cpu")
    method: AIM = eng.method  # type: ignore[assignment]
    method.on_epoch_start(eng)
    inputs, labels = next(eng.iterate(small_data.train, shuffle=True))
    eng.model.train()
    method.epoch_means.reset()
    ctx = eng.train_step(inputs, labels)
    got = method.metrics()
    # L_mod = Σ_d L_d, each a convex combination of the original blocks' CE over distances
    assert got["loss/mod"] > 0 and ctx.loss is not None
    with_dam = Engine(small_data, "aim", {**FAST, "epochs": 1, "start_epoch": 0, "pam": False}, device="cpu")
    with_dam.method.on_epoch_start(with_dam)
    with_dam.model.train()
    with_dam.method.epoch_means.reset()
    with_dam.train_step(inputs, labels)
    alphas = [with_dam.method.metrics()[f"alpha/d{d}"] for d in range(1, 5)]
    assert all(0 <= a < 1 for a in alphas)  # two modalities: CV of two numbers in [0, 1) here
    assert got["loss/mod"] > with_dam.method.metrics()["loss/mod"]


def test_search_space_loads():
    from tunebal.tune.spaces import load_space, searched_knobs

    space = load_space("aim", "synth", 8)
    assert {"start_epoch", "lr", "latent_dim"} <= set(searched_knobs(space))
    start = space["start_epoch"]
    assert start.lower == 0 and start.upper == 5  # randint [0, 0.5·8] inclusive
