"""AIM (Adaptive Intra-Network Modulation): the formulas against hand-computed values, the decoupler's gradient path
(Eq. 13), what the mask learns, Algorithm 1's phases, checkpoint/resume, every fusion, three
modalities and the decoupler's size."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from tests._builders import tree_equal

from tunebal.data import build_dataset
from tunebal.engine import Engine
from tunebal.methods.aim import (
    AIM,
    BlockDecoupler,
    Decoupler,
    num_decoupler_parameters,
    run_block,
)
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
    tree_equal(buffers, model.state_dict())  # no running-statistics update
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
    aim = Engine(small_data, "aim", {**cfg, "start_epoch": 1, "proto_steps": 3, "pam_after_start": False}, device="cpu")
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
    tree_equal(base.model.state_dict(), aim.model.state_dict())  # bit-identical to joint training
    assert any(not torch.equal(protos0[m], method.dap.protos[m]) for m in protos0)
    assert any(not torch.equal(dec0[k], v) for k, v in method.decoupler.state_dict().items())

    # the DAP fit on its own: framework parameters and buffers bit-unchanged, prototypes moved
    before = {k: v.clone() for k, v in aim.model.state_dict().items()}
    aim.optimizer.zero_grad(set_to_none=True)  # the last training step's gradients
    protos1 = {m: p.detach().clone() for m, p in method.dap.protos.items()}
    method.fit_dap(aim, 3)
    tree_equal(before, aim.model.state_dict())
    assert all(p.grad is None for p in aim.model.parameters())
    assert all(not torch.equal(protos1[m], method.dap.protos[m]) for m in protos1)

    # epoch 1 >= E: the modulation loss is active and changes the framework's trajectory;
    # pam_after_start=false (Algorithm 1 line 10 read literally): the decoupler stays put
    dec1 = {k: v.clone() for k, v in method.decoupler.state_dict().items()}
    base.run_epoch()
    metrics = aim.run_epoch()
    assert metrics["method/phase"] == 1.0 and metrics["method/loss/mod"] > 0
    assert "method/loss/pam" not in metrics
    tree_equal(dec1, method.decoupler.state_dict())
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
    eng = Engine(small_data, "aim", {**FAST, "epochs": 1, "start_epoch": 0, "pam": False, "distance": "euclidean"}, device="cpu")
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
    tree_equal(state_at_1, resumed.method.state_dict())  # round trip of every piece of AIM state
    assert resumed.epoch == 1 and resumed.method.dap_fitted
    resumed.run_epoch()  # crosses the phase boundary: epoch 1 = E
    tree_equal(straight.model.state_dict(), resumed.model.state_dict())
    tree_equal(straight.method.state_dict(), resumed.method.state_dict())
    tree_equal(straight.optimizer.state_dict(), resumed.optimizer.state_dict())


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


# --------------------------------------------------------------------------- Algorithm 1's wiring


def _cdist_logits(x: torch.Tensor, p: torch.Tensor, distance: str = "euclidean") -> torch.Tensor:
    """−δ by torch's own elementwise Euclidean distance (independent of losses.py); standardised:
    divided by the batch mean of each sample's (population) std of δ over the prototypes, a constant."""
    d = torch.cdist(x.reshape(x.shape[0], -1), p.reshape(p.shape[0], -1), compute_mode="donot_use_mm_for_euclid_dist")
    if distance == "standardised":
        d = d / d.detach().var(dim=1, unbiased=False).sqrt().mean()
    return -d


def _s_and_ce(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    p = torch.softmax(logits, dim=1)[torch.arange(len(labels)), labels]
    return p.mean(), nn.functional.cross_entropy(logits, labels)


def _hand_decouple(layer, weight: torch.Tensor, bias: torch.Tensor | None, branch: str):
    """θ^b or θ^a of one layer written out (Eq. 7), plus ||θ − Ψ(θ_lat)||² (Eq. 8)."""
    rows = weight.reshape(weight.shape[0], -1)
    if bias is not None:
        rows = torch.cat([rows, bias[:, None]], 1)
    lat = rows @ layer.lat.weight.t() + layer.lat.bias
    w = torch.sigmoid(lat @ layer.mask.weight.t() + layer.mask.bias)
    keep = w if branch == "aux" else 1 - w
    new = (lat * keep) @ layer.dec.weight.t() + layer.dec.bias
    rec = (rows - (lat @ layer.dec.weight.t() + layer.dec.bias)).pow(2).sum()
    if bias is not None:
        return new[:, :-1].reshape(weight.shape), new[:, -1], rec
    return new.reshape(weight.shape), None, rec


def _hand_block(block: nn.Module, dec, x: torch.Tensor, branch: str, const_theta: bool):
    """Run ``block`` with its decoupled weights built by hand, on clones of its buffers."""
    params = dict(block.named_parameters())
    if const_theta:
        params = {k: v.detach() for k, v in params.items()}
    new, rec = {}, 0.0
    for (wname, bname), layer in zip(dec.names, dec.layers):
        w, b, r = _hand_decouple(layer, params[wname], params[bname] if bname else None, branch)
        new[wname] = w
        if bname:
            new[bname] = b
        rec = rec + r
    buffers = {k: v.clone() for k, v in block.named_buffers()}
    return torch.func.functional_call(block, {**params, **new, **buffers}, (x,)), rec


WIRING = {**FAST, "epochs": 1, "start_epoch": 0, "seed": 3, "ce_weight": 0.7, "mod_weight": 1.3, "rec_weight": 0.4}


def _engine_step_grads(eng: Engine):
    """One engine step on the first shuffled batch; returns (batch, loss, gradients of the
    framework, the decoupler and the DAP as the engine had them before its optimisers stepped,
    copies of model/decoupler/DAP taken before the step)."""
    method: AIM = eng.method  # type: ignore[assignment]
    method.on_epoch_start(eng)  # fits the DAP once (interpretation 5)
    if method.decoupler is not None:  # a decoupler that has learnt something: ŝ ≠ s, w ≠ 0.5
        gen = torch.Generator().manual_seed(11)
        with torch.no_grad():
            for name, p in method.decoupler.named_parameters():
                if ".mask." in name:
                    p.add_(torch.randn(p.shape, generator=gen))
    eng.model.train()
    inputs, labels = next(eng.iterate(eng.data.train, shuffle=True))
    before = (copy.deepcopy(eng.model), copy.deepcopy(method.decoupler), copy.deepcopy(method.dap))
    grads: dict[str, dict[str, torch.Tensor | None]] = {}

    def snapshot(ctx, orig=method.after_backward):
        for key, mod in (("model", eng.model), ("dec", method.decoupler), ("dap", method.dap)):
            if mod is not None:
                grads[key] = {n: None if p.grad is None else p.grad.clone() for n, p in mod.named_parameters()}
        return orig(ctx)

    method.after_backward = snapshot  # type: ignore[method-assign]
    ctx = eng.train_step(inputs, labels)
    return inputs, labels, float(ctx.loss.detach()), grads, before


def _close(got: dict, want: dict, what: str) -> None:
    assert set(got) == set(want), what
    for n, w in want.items():
        g = torch.zeros_like(w) if got[n] is None else got[n]
        scale = float(w.abs().max()) + 1e-6
        assert float((g - w).abs().max()) <= 1e-3 * scale + 1e-7, f"{what}: {n}"


@pytest.mark.parametrize("aux_form, distance", [("factorised", "standardised"), ("direct", "euclidean")])
def test_one_step_matches_hand_built_algorithm_1(small_data, aux_form, distance):
    """One modulation step against CE + Σ_d α_d Σ_m (ρ L + ρ̂ L̂) + L_pam + Eq. 5 written out with
    torch ops: α from the original blocks' s (Eq. 14), ρ/ρ̂ from s and ŝ (Eq. 12), L̂ from the
    auxiliary block θ^b(θ) on the original block's input with the decoupler constant (Eq. 13
    reaches θ), L_pam from the complement block with θ, I_d and the DAP constant (Eq. 8),
    and Eq. 5 training the DAP alone, the framework frozen and P_d constant in L_mod."""
    eng = Engine(small_data, "aim", {**WIRING, "aux_form": aux_form, "distance": distance}, device="cpu")
    inputs, labels, loss, grads, (ref, dec, dap) = _engine_step_grads(eng)
    mods, k, b = small_data.modalities, small_data.num_classes, len(labels)

    # framework forward in train mode (BN running statistics move exactly as the engine's did)
    ins, outs, feats = {}, {}, {}
    for m in mods:
        enc = ref.encoders[m]
        h = enc.prepare(inputs[m])
        ins[m], outs[m] = [], []
        for block in enc.blocks:
            ins[m].append(h)
            h = block(h)
            outs[m].append(h)
        feats[m] = enc.pool(h, b)
    ce = nn.functional.cross_entropy(ref.head(feats), labels)
    # DAP (Eq. 6): prototypes through the frozen framework in eval mode, after this batch's update
    frozen_ref = copy.deepcopy(ref).requires_grad_(False).eval()
    protos, pfeats = {}, {}
    for m in mods:
        enc = frozen_ref.encoders[m]
        h = enc.prepare(dap.protos[m])
        protos[m] = []
        for block in enc.blocks:
            h = block(h)
            protos[m].append(h)
        pfeats[m] = enc.pool(h, k)
    l_cls = nn.functional.cross_entropy(frozen_ref.head(pfeats), torch.arange(k))
    l_rec = sum((dap.decoders[m](dap.protos[m]) - eng.method.class_means[m]).pow(2).sum() for m in mods) / (len(mods) * k)

    depth = len(outs[mods[0]])
    s = torch.zeros(len(mods), depth)
    s_aux = torch.zeros(len(mods), depth)
    L = [[None] * depth for _ in mods]
    L_aux = [[None] * depth for _ in mods]
    l_pam = 0.0
    for i, m in enumerate(mods):
        for d in range(depth):
            target = protos[m][d].detach()
            s_md, L[i][d] = _s_and_ce(_cdist_logits(outs[m][d].reshape(b, -1), target, distance), labels)
            s[i, d] = s_md.detach()
            block, bdec = ref.encoders[m].blocks[d], dec.blocks[m][d]
            dec_consts = copy.deepcopy(bdec).requires_grad_(False)
            out, _ = _hand_block(block, dec_consts, ins[m][d], "aux", const_theta=False)
            s_md, L_aux[i][d] = _s_and_ce(_cdist_logits(out.reshape(b, -1), target, distance), labels)
            s_aux[i, d] = s_md.detach()
            out, rec = _hand_block(block, bdec, ins[m][d].detach(), "comp", const_theta=True)
            l_pam = l_pam + _s_and_ce(_cdist_logits(out.reshape(b, -1), target, distance), labels)[1] + rec
    l_mod = 0.0
    for d in range(depth):
        col, col_aux = s[:, d], s_aux[:, d]
        alpha = ((col - col.mean()) ** 2).mean().sqrt() / col.mean()
        denom = torch.exp(-col).sum() + torch.exp(-col_aux).sum()
        rho, rho_aux = torch.exp(-col) / denom, torch.exp(-col_aux) / denom
        l_mod = l_mod + alpha * sum(rho[i] * L[i][d] + rho_aux[i] * L_aux[i][d] for i in range(len(mods)))
    framework_loss = WIRING["ce_weight"] * ce + WIRING["mod_weight"] * l_mod
    dap_loss = l_cls + WIRING["rec_weight"] * l_rec
    total = framework_loss + l_pam + dap_loss
    assert loss == pytest.approx(float(total.detach()), rel=1e-4)

    def grads_of(loss, module):
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        gs = torch.autograd.grad(loss, [p for _, p in named], retain_graph=True, allow_unused=True)
        return {n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(named, gs)}

    _close(grads["model"], grads_of(framework_loss, ref), "framework: ce_weight·CE + mod_weight·L_mod only")
    _close(grads["dec"], grads_of(l_pam, dec), "decoupler: L_pam only")
    _close(grads["dap"], grads_of(dap_loss, dap), "DAP: Eq. 5 only")


def test_modulation_loss_alone_reaches_only_the_encoders_and_descends(small_data):
    """With CE weighted 0 and the decoupler frozen after E, the framework learns from L_mod
    alone: every encoder block gets a gradient, the classifier none (L_mod never reaches it),
    the decoupler none (its parameters are constants in L̂), and one small SGD step lowers L_mod
    on the same batch against the same prototypes (cached: ``proto_refresh`` > steps)."""
    cfg = {**WIRING, "ce_weight": 0.0, "pam_after_start": False, "proto_refresh": 1000, "lr": 0.2, "momentum": 0.0, "weight_decay": 0.0}
    eng = Engine(small_data, "aim", cfg, device="cpu")
    inputs, labels, _, grads, _ = _engine_step_grads(eng)
    method: AIM = eng.method  # type: ignore[assignment]
    model_grads = grads["model"]
    for m in small_data.modalities:
        for d in range(method.depth):
            names = [n for n in model_grads if n.startswith(f"encoders.{m}.blocks.{d}.")]
            assert any(model_grads[n] is not None and model_grads[n].abs().sum() > 0 for n in names), (m, d)
    assert all(g is None or not g.any() for n, g in model_grads.items() if n.startswith("classifier."))
    assert all(g is None for g in grads["dec"].values())
    first = method.metrics()
    method.epoch_means.reset()
    method._vec_sums.clear()
    method._vec_counts.clear()
    eng.train_step(inputs, labels)
    second = method.metrics()

    def l_mod(losses, weights):  # Σ_d α_d Σ_m (ρ L + ρ̂ L̂) (Eq. 15) with the first step's α, ρ, ρ̂
        return sum(
            weights[f"alpha/d{d}"] * sum(weights[f"{r}/{m}/d{d}"] * losses[f"{l}/{m}/d{d}"] for r, l in (("rho", "L"), ("rho_aux", "L_aux")) for m in small_data.modalities)
            for d in range(1, method.depth + 1)
        )

    assert l_mod(first, first) == pytest.approx(first["loss/mod"], rel=1e-5)
    assert l_mod(second, first) < l_mod(first, first) - 1e-4


def test_literal_readings_are_knobs(small_data):
    """dap_from_mod: L_mod also reaches the DAP (its gradient differs from Eq. 5's alone);
    pam_after_start=false: L_pam is gone after E and the decoupler gets no gradient."""
    base = _engine_step_grads(Engine(small_data, "aim", WIRING, device="cpu"))[3]
    literal = _engine_step_grads(Engine(small_data, "aim", {**WIRING, "dap_from_mod": True, "pam_after_start": False}, device="cpu"))[3]
    assert any(not torch.allclose(base["dap"][n], literal["dap"][n]) for n in base["dap"])
    assert all(g is None for g in literal["dec"].values())
    assert all(g is not None for g in base["dec"].values())


def test_defaults_follow_the_papers_intent_and_e0_trains_the_decoupler(small_data):
    knob = {k.name: k.default for k in AIM.KNOBS}
    assert knob["pam_after_start"] is True and knob["dap_from_mod"] is False
    assert knob["distance"] == "standardised" and knob["aux_form"] == "factorised" and knob["proto_refresh"] == 1
    eng = Engine(small_data, "aim", {**FAST, "epochs": 1, "start_epoch": 0, "seed": 2}, device="cpu")
    metrics = eng.run_epoch()  # E = 0: modulation from the first step, the decoupler learns alongside
    assert metrics["method/phase"] == 1.0 and metrics["method/loss/pam"] > 0
    assert metrics["method/mask_mean"] != pytest.approx(0.5, abs=1e-4)


def test_prototype_refresh_schedule(small_data):
    """proto_refresh = 2: P_d is propagated and the DAP takes an Eq. 5 step on steps 0 and 2 of
    the epoch only; in between, L_mod uses the prototypes propagated last."""
    eng = Engine(small_data, "aim", {**FAST, "epochs": 1, "start_epoch": 0, "proto_refresh": 2}, device="cpu")
    method: AIM = eng.method  # type: ignore[assignment]
    method.on_epoch_start(eng)
    eng.model.train()
    changed = []
    for inputs, labels in eng.iterate(small_data.train, shuffle=True):  # 3 steps
        before = {n: p.detach().clone() for n, p in method.dap.named_parameters()}
        cache = method._proto_cache
        eng.train_step(inputs, labels)
        changed.append(any(not torch.equal(before[n], p) for n, p in method.dap.named_parameters()))
        if not changed[-1]:
            assert method._proto_cache is cache  # the same tensors, not re-propagated
    assert changed == [True, False, True]


def test_complement_outperforms_auxiliary_after_the_pre_phase(_isolated_cache):
    """Fig. 5a: after E epochs of Eq. 8, the complement block (trained to perform) beats the
    auxiliary block (the under-optimised parameters) at every depth, on average over modalities."""
    data = build_dataset("synth", {"n_train": 192, "n_val": 16, "n_test": 16})
    eng = Engine(data, "aim", {**COMMON, "batch_size": 32, "epochs": 3, "start_epoch": 2, "proto_steps": 5, "decoupler_lr": 0.05, "seed": 1}, device="cpu")
    for _ in range(3):
        metrics = eng.run_epoch()
    assert metrics["method/phase"] == 1.0
    gaps = [
        sum(metrics[f"method/s_comp/{m}/d{d}"] - metrics[f"method/s_aux/{m}/d{d}"] for m in data.modalities)
        for d in range(1, 5)
    ]
    assert all(g > 0 for g in gaps), gaps


def test_factorised_auxiliary_convolution_is_exact():
    """conv(x, mix·basis) = mix ⋆ conv(x, basis): outputs and gradients to x, θ and the whole
    decoupler (the mask included: Eq. 13's path) equal the direct form's, in float64."""
    import torchvision

    torch.manual_seed(0)
    cases = [
        (torchvision.models.resnet18().layer2.double(), (3, 64, 12, 12)),  # 3x3 convs + a 1x1 stride-2 downsample
        (nn.Sequential(nn.Linear(40, 64), nn.BatchNorm1d(64), nn.ReLU()).double(), (3, 40)),  # linear with a bias
        (nn.Sequential(nn.Conv2d(24, 48, 3, padding=1, stride=2, bias=True), nn.BatchNorm2d(48)).double(), (3, 24, 12, 12)),
    ]
    for block, shape in cases:
        dec = BlockDecoupler(block, 8).double()
        with torch.no_grad():
            for layer in dec.layers:
                for t in (layer.mask.weight, layer.mask.bias, layer.dec.bias):
                    t.normal_(0, 0.3)
        x = torch.randn(shape, dtype=torch.double, requires_grad=True)
        results = []
        for factorised in (False, True):
            block.zero_grad(set_to_none=True)
            dec.zero_grad(set_to_none=True)
            x.grad = None
            for branch, detach in (("aux", False), ("comp", True)):
                out = dec.decouple(block, (branch,), detach_theta=detach, factorised=factorised)
                params, factors = out.branch(branch)
                assert bool(factors) == factorised  # every layer here is cheaper factorised
                y = run_block(block, params, x, factors)
                weight = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape)
                ((y * weight).sum() + out.rec).backward()
            grads = [x.grad] + [p.grad for p in block.parameters()] + [p.grad for p in dec.parameters()]
            results.append((y.detach(), grads))
        (y0, g0), (y1, g1) = results
        assert torch.allclose(y0, y1, atol=1e-10)
        for a, b in zip(g0, g1):
            assert (a is None) == (b is None)
            if a is not None:
                assert torch.allclose(a, b, atol=1e-9, rtol=1e-9)


def test_prototype_orthogonality_eq16_is_logged_per_depth(small_data):
    from tunebal.methods.aim.method import prototype_overlap

    p = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, -2.0]])
    c = 1 / math.sqrt(2)  # |cos| of the three pairs: c, 0, c
    assert float(prototype_overlap(p)) == pytest.approx((c + 0 + c) / 3)
    eng = Engine(small_data, "aim", {**FAST, "epochs": 1, "start_epoch": 1}, device="cpu")
    metrics = eng.run_epoch()
    protos, _ = eng.method.dap.propagate(eng.model)
    assert metrics["method/proto_cos/audio/d3"] == pytest.approx(float(prototype_overlap(protos["audio"][2])), rel=1e-5)
    assert all(0 <= metrics[f"method/proto_cos/{m}/d{d}"] <= 1 for m in small_data.modalities for d in range(1, 5))


def test_standardised_distance_by_hand_and_scale_free():
    x = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    p = torch.tensor([[0.0, 0.0], [6.0, 8.0], [3.0, 0.0]])
    d = torch.tensor([[0.0, 10.0, 3.0], [5.0, 5.0, 4.0]])  # Euclidean distances by hand
    sd0 = math.sqrt(((d[0] - d[0].mean()) ** 2).mean())
    sd1 = math.sqrt(((d[1] - d[1].mean()) ** 2).mean())
    got = distance_logits(x, p, "standardised")
    assert torch.allclose(got, -d / ((sd0 + sd1) / 2), atol=1e-5)
    assert torch.allclose(distance_logits(7 * x, 7 * p, "standardised"), got, atol=1e-5)
    assert torch.allclose(distance_logits(x, p), -d, atol=1e-5)  # the paper's raw form
