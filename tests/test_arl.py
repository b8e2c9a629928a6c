"""ARL: statistics and coefficients by hand, gradient scaling, loss, fusions, M = 3, resume."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from tunebal.engine import Engine
from tunebal.errors import ConfigError
from tunebal.methods import get_method_class
from tunebal.methods.arl import arl_coefficients, arl_statistics, entropy

torch.set_num_threads(1)

FAST = {"width": 4, "batch_size": 64}



def _softmax(row):
    e = [math.exp(v) for v in row]
    return [v / sum(e) for v in e]


def _entropy(row):
    p = _softmax(row)
    return -sum(v * math.log(v) for v in p)


# --------------------------------------------------------------------------- by hand

P0 = [[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]]  # modality m0: confident
P1 = [[0.5, 0.0, 0.0], [0.0, 0.0, 0.2]]  # modality m1: unsure
Y = [0, 1]


def test_statistics_and_coefficients_by_hand():
    logits = [torch.tensor(P0), torch.tensor(P1)]
    labels = torch.tensor(Y)
    # Eq. 17 with the entropy's sign: q = 1 / batch-mean entropy (positive)
    h0 = sum(_entropy(r) for r in P0) / 2
    h1 = sum(_entropy(r) for r in P1) / 2
    torch.testing.assert_close(entropy(logits[0]), torch.tensor([_entropy(r) for r in P0]))
    s0 = [_softmax(r)[y] for r, y in zip(P0, Y)]
    s1 = [_softmax(r)[y] for r, y in zip(P1, Y)]

    q, Q, D = arl_statistics(logits, labels, "ratio_of_means")
    assert q[0].item() == pytest.approx(1 / h0, rel=1e-6) and q[1].item() == pytest.approx(1 / h1, rel=1e-6)
    q_ratio = h1 / h0  # (1/h0)/(1/h1); Eq. 17 as printed (−1/H) gives the same ratio
    assert Q[0, 1].item() == pytest.approx(q_ratio, rel=1e-6)
    d_rom = sum(s0) / sum(s1)
    assert D[0, 1].item() == pytest.approx(d_rom, rel=1e-6)
    assert D[1, 0].item() == pytest.approx(1 / d_rom, rel=1e-6)
    _, _, D_mor = arl_statistics(logits, labels, "mean_of_ratios")
    d_mor = (s0[0] / s1[0] + s0[1] / s1[1]) / 2
    assert D_mor[0, 1].item() == pytest.approx(d_mor, rel=1e-6)
    assert abs(d_mor - d_rom) > 1e-3  # the two estimates differ on this batch

    # Eq. 18: [a0, a1] = softmax([T q0/q1, T d0/d1]); the q-ratio entry goes to m0
    for T in (1.0, 4.0, 8.0):
        a = arl_coefficients(Q, D, T)
        ref = _softmax([T * q_ratio, T * d_rom])
        assert a[0].item() == pytest.approx(ref[0], rel=1e-5)
        assert a[1].item() == pytest.approx(ref[1], rel=1e-5)
    # direction (§3.2): m0 is accelerated (a0 > 1/2) exactly when its dependency ratio is below
    # the target ratio. Here m0 already dominates beyond its inverse-variance share: m1 is favoured
    assert d_rom > q_ratio and arl_coefficients(Q, D, 4.0)[0] < 0.5
    Q_swapped = torch.tensor([[1.0, d_rom + 0.5], [1 / (d_rom + 0.5), 1.0]])
    assert arl_coefficients(Q_swapped, D, 4.0)[0] > 0.5


def test_three_modality_rule_reduces_and_is_balanced():
    gen = torch.Generator().manual_seed(0)
    logits = [torch.randn(16, 5, generator=gen) * s for s in (3.0, 1.0, 0.3)]
    labels = torch.randint(0, 5, (16,), generator=gen)
    q, Q, D = arl_statistics(logits, labels)
    a3 = arl_coefficients(Q, D, 4.0)
    # pairwise rule: a^m = mean over its pairs, i takes P_ij, j takes 1 - P_ij for i < j
    P = lambda i, j: _softmax([4.0 * Q[i, j].item(), 4.0 * D[i, j].item()])[0]  # noqa: E731
    expected = [(P(0, 1) + P(0, 2)) / 2, ((1 - P(0, 1)) + P(1, 2)) / 2, ((1 - P(0, 2)) + (1 - P(1, 2))) / 2]
    torch.testing.assert_close(a3, torch.tensor(expected), rtol=1e-5, atol=1e-6)
    assert a3.sum().item() == pytest.approx(1.5, rel=1e-6)  # Σ a = M/2
    # restricted to the first two modalities it is exactly the two-modality Eq. 18
    a2 = arl_coefficients(Q[:2, :2], D[:2, :2], 4.0)
    assert a2[0].item() == pytest.approx(P(0, 1), rel=1e-5) and a2.sum().item() == pytest.approx(1.0, rel=1e-6)
    # when every dependency ratio equals its target ratio, all coefficients are 1/2
    torch.testing.assert_close(arl_coefficients(Q, Q.clone(), 8.0), torch.full((3,), 0.5))


# --------------------------------------------------------------------------- loss and gradients


def _capture_step(engine: Engine):
    grads: dict[str, torch.Tensor] = {}
    original = engine.optimizer.step

    def step(*args, **kwargs):
        for name, p in engine.model.named_parameters():
            if p.grad is not None:
                grads[name] = p.grad.detach().clone()
        return original(*args, **kwargs)

    engine.optimizer.step = step
    try:
        inputs, labels = next(engine.iterate(engine.data.train, shuffle=True))
        model_before = copy.deepcopy(engine.model)
        ctx = engine.train_step(inputs, labels)
    finally:
        engine.optimizer.step = original
    return grads, ctx, inputs, labels, model_before


def _independent_logits(model, inputs):
    """Fused and zero-out logits recomputed by hand (the other features zeroed at the fusion input)."""
    feats = model.encode(inputs).features
    fused = model.head(feats)
    uni = {}
    for m in model.modalities:
        uni[m] = model.head({j: (z if j == m else torch.zeros_like(z)) for j, z in feats.items()})
    return fused, uni


@pytest.mark.parametrize("gamma,T", [(4.0, 4.0), (2.5, 8.0)])
def test_loss_and_encoder_gradient_scaling(data2, gamma, T):
    config = {**FAST, "seed": 3, "gamma": gamma, "T": T}
    g_plain, _, _, _, _ = _capture_step(Engine(data2, "arl", {**config, "modulate": False}, device="cpu"))
    g_arl, ctx, inputs, labels, model = _capture_step(Engine(data2, "arl", config, device="cpu"))

    with torch.no_grad():
        fused, uni = _independent_logits(model, inputs)
    expected_loss = F.cross_entropy(fused, labels) + gamma * sum(F.cross_entropy(uni[m], labels) for m in data2.modalities)
    assert ctx.loss.item() == pytest.approx(expected_loss.item(), rel=1e-5)

    # coefficients recomputed by hand from the independent zero-out logits (Eqs. 4, 17, 18)
    m0, m1 = data2.modalities
    h = {m: float(entropy(uni[m]).mean()) for m in (m0, m1)}
    s = {m: float(torch.softmax(uni[m], 1).gather(1, labels[:, None]).sum()) for m in (m0, m1)}
    a_ref = _softmax([T * (h[m1] / h[m0]), T * (s[m0] / s[m1])])
    assert abs(a_ref[0] - 0.5) > 1e-3  # a real asymmetry on this batch
    a = {m0: a_ref[0], m1: a_ref[1]}

    n_enc = 0
    for name, gp in g_plain.items():
        ga = g_arl[name]
        if name.startswith("encoders."):
            m = name.split(".")[1]
            torch.testing.assert_close(ga, gp * (1 + a[m]), rtol=1e-4, atol=1e-7)
            n_enc += 1
        else:
            assert torch.equal(ga, gp), name  # fusion and classifier untouched
    assert n_enc > 4


def test_warmup_holds_gamma_one_and_balanced_coefficients(data2):
    config = {**FAST, "seed": 3, "gamma": 4.0, "warmup": 1}
    g_plain, _, _, _, _ = _capture_step(Engine(data2, "arl", {**config, "modulate": False}, device="cpu"))
    g_arl, ctx, inputs, labels, model = _capture_step(Engine(data2, "arl", config, device="cpu"))
    with torch.no_grad():
        fused, uni = _independent_logits(model, inputs)
    expected_loss = F.cross_entropy(fused, labels) + 1.0 * sum(F.cross_entropy(uni[m], labels) for m in data2.modalities)
    assert ctx.loss.item() == pytest.approx(expected_loss.item(), rel=1e-5)
    for name, gp in g_plain.items():
        factor = 1.5 if name.startswith("encoders.") else 1.0
        torch.testing.assert_close(g_arl[name], gp * factor, rtol=1e-5, atol=1e-8)


# --------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("fusion", ["concat", "sum", "film", "gated"])
def test_trains_one_epoch_with_every_fusion(data2, fusion):
    engine = Engine(data2, "arl", {**FAST, "fusion": fusion, "seed": 0}, device="cpu")
    metrics = engine.run_epoch()
    assert math.isfinite(metrics["train/loss"])
    a = [metrics[f"method/a_{m}"] for m in data2.modalities]
    assert all(0.0 < v < 1.0 for v in a) and sum(a) == pytest.approx(1.0, rel=1e-5)
    assert "method/q_ratio_audio_visual" in metrics and "method/d_ratio_audio_visual" in metrics


def test_trains_with_three_modalities(data3):
    metrics = Engine(data3, "arl", {**FAST, "seed": 0}, device="cpu").run_epoch()
    assert math.isfinite(metrics["train/loss"])
    a = [metrics[f"method/a_{m}"] for m in data3.modalities]
    assert sum(a) == pytest.approx(1.5, rel=1e-5)
    assert "method/d_ratio_visual_text" in metrics


def test_single_modality_is_a_config_error():
    with pytest.raises(ConfigError, match="at least 2"):
        get_method_class("arl").check_compatible(1, "concat")


