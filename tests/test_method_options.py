"""Every declared option of ogm, opm, opm_ogm, arl, amss and amss_plus does what its help says.

This file holds the options that had no test of their own; the others are pinned elsewhere:

========================  ===========================================================================
ogm alpha, form           test_ogm_opm.py::test_ogm_scales_only_the_dominant_encoder
ogm start                 test_ogm_opm.py::test_ogm_window_and_ge_noise; here: the window below
ogm end                   here: test_ogm_window_is_inclusive_at_both_ends
ogm ge, ge_scope          test_ogm_opm.py::test_ogm_window_and_ge_noise
ogm ge_std                here: test_ogm_ge_noise_std_per_tensor_or_per_encoder
ogm conv_only             test_ogm_opm.py::test_ogm_conv_only_leaves_non_conv_params
opm q_base, lam           here: test_opm_q_base_and_lam_enter_eq8_in_their_places (+ opm_ogm)
opm p_exe, rescale,       test_ogm_opm.py::test_opm_uses_previous_step_rho_rescale_and_p_exe
    warmup
opm_ogm (union)           test_mechanisms.py::test_opm_ogm_takes_ogm_rho_from_the_unmodified_features
arl T, gamma, d_reduce,   test_mechanisms.py::test_arl_encoder_gradient_is_the_scaled_autograd_gradient_of_eq22
    modulate, residual
arl warmup                test_arl.py::test_warmup_holds_gamma_one_and_balanced_coefficients
amss tau, ms_momentum     test_amss.py::test_momentum_and_update_ratio_eq3_eq4
amss clamp, entropy       here: test_amss_clamp_and_entropy_in_the_method
amss mask_unit, scope,    test_amss.py::test_after_backward_keeps_exactly_ceil_pN_units
    mask_norm
amss fisher,              test_mechanisms.py::test_amss_selection_frequencies_in_the_method_follow_the_fisher
    fisher_source
amss mask_parts           test_amss.py::test_classifier_mask_freezes_the_masked_columns (+ ..._ceil_pN_units)
amss_plus plus_a          here: test_amss_plus_a_weights_kept_units_by_one_over_pi_plus_a_over_c
========================  ===========================================================================
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tests._builders import VEC, autograd_grads, record_steps, vector_data, zero_out
from tunebal.engine import Engine
from tunebal.methods import StepContext, get_method_class
from tunebal.methods._amss_mask import IMPORTANCE_FLOOR, sample_units
from tunebal.methods._modulation import ogm_coefficients
from tunebal.metrics import discrepancy_ratios, true_class_scores
from tunebal.models import Encoded

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")


def _k_by_hand(rec, modalities, alpha=0.8, form="cvpr") -> torch.Tensor:
    model, y = rec["model"], rec["labels"]
    with torch.no_grad():
        uni = zero_out(model, model.encode(rec["inputs"]).features)
    rho = discrepancy_ratios({m: true_class_scores(uni[m], y) for m in modalities})
    return ogm_coefficients(torch.tensor([rho[m] for m in modalities]), alpha, form)


def _plain_grads(rec) -> dict[str, torch.Tensor]:
    model = rec["model"]
    return autograd_grads(model, F.cross_entropy(model(rec["inputs"]), rec["labels"]))


# --------------------------------------------------------------------------- OGM


@pytest.mark.parametrize("start,end,active", [(0, 1, [True, True, False]), (1, 1, [False, True, False]), (1, -1, [False, True, True])])
def test_ogm_window_is_inclusive_at_both_ends(start, end, active):
    data = vector_data(32, dims={"a": 6, "b": 6}, informative=("a",))
    knobs = {"form": "cvpr", "alpha": 0.8, "ge": False, "start": start, "end": end}
    engine = Engine(data, "ogm", {**VEC, "batch_size": 32, "lr": 0.1, **knobs})
    with record_steps(engine) as steps:
        for _ in range(3):  # one step per epoch
            engine.train_epoch()
    for epoch, rec in enumerate(steps):
        assert rec["epoch"] == epoch
        k = _k_by_hand(rec, data.modalities)
        assert float(k.min()) < 0.5  # the CVPR form modulates the dominant encoder strongly
        if not active[epoch]:
            k = torch.ones_like(k)
        for name, g in _plain_grads(rec).items():
            if name.startswith("encoders."):
                g = g * k[data.modalities.index(name.split(".")[1])]
            torch.testing.assert_close(rec["grads"][name], g, rtol=1e-4, atol=1e-7, msg=f"epoch {epoch} {name}")


@pytest.mark.parametrize("ge_std", ["tensor", "encoder"])
def test_ogm_ge_noise_std_per_tensor_or_per_encoder(ge_std):
    """GE noise h = (k·g + h) − k·g has the std of the unmodulated gradient: of each tensor
    (``tensor``) or of all of the encoder's entries together (``encoder``)."""
    data = vector_data(64, dims={"a": 6, "b": 6}, informative=("a",))
    knobs = {"form": "cvpr", "alpha": 0.8, "ge": True, "ge_std": ge_std}
    engine = Engine(data, "ogm", {**VEC, "width": 8, "batch_size": 64, "lr": 0.1, **knobs})
    with record_steps(engine) as steps:
        engine.train_epoch()
    rec = steps[0]
    k = _k_by_hand(rec, data.modalities)
    g = _plain_grads(rec)
    checked = distinguishable = 0
    for m in data.modalities:
        names = [n for n in g if n.startswith(f"encoders.{m}.")]
        sigma_enc = float(torch.cat([g[n].reshape(-1) for n in names]).std())
        for n in names:
            noise = rec["grads"][n] - k[data.modalities.index(m)] * g[n]
            size = noise.numel()
            if size < 500:
                continue
            sigma_t = float(g[n].std())
            target = sigma_enc if ge_std == "encoder" else sigma_t
            other = sigma_t if ge_std == "encoder" else sigma_enc
            # the sample std of n Gaussian draws has relative sd ≈ 1/√(2n): allow 5 of them
            tol = 5 / math.sqrt(2 * size)
            assert abs(float(noise.std()) / target - 1) < tol, (n, float(noise.std()), target)
            assert abs(float(noise.mean())) < 5 * target / math.sqrt(size)  # zero mean
            checked += 1
            distinguishable += abs(other / target - 1) > 3 * tol
    assert checked >= 4 and distinguishable >= 2  # the other rule would have failed here


# --------------------------------------------------------------------------- OPM


class _FixedLogits:
    def __init__(self, logits):
        self.modalities = tuple(logits)
        self.logits = logits

    def unimodal_logits(self, features):
        return dict(self.logits)


@pytest.mark.parametrize("method", ["opm", "opm_ogm"])
def test_opm_q_base_and_lam_enter_eq8_in_their_places(method):
    # q = q_base·(1 + λ·tanh(ρ − 1)) for ρ > 1 (Eq. 8); distinct q_base and λ catch a swap
    mods, b, k = ("audio", "visual"), 8, 4
    labels = torch.zeros(b, dtype=torch.long)
    logits = {"audio": torch.zeros(b, k).index_fill_(1, torch.tensor([0]), 2.0), "visual": torch.zeros(b, k)}
    s_a, s_v = math.exp(2) / (math.exp(2) + 3), 0.25
    rho_a = s_a / s_v
    cls = get_method_class(method)
    for q_base, lam in ((0.3, 0.8), (0.6, 0.1)):
        opm = cls(cls.KNOBS.resolve({"q_base": q_base, "lam": lam}), mods, k, seed=0)
        feats = {m: torch.ones(b, 2) for m in mods}
        ctx = StepContext(model=_FixedLogits(logits), inputs={}, labels=labels, epoch=0, step=0, encoded=Encoded(features=feats))
        opm.before_fusion(ctx)
        q = (opm.opm if method == "opm_ogm" else opm).q
        assert q[0].item() == pytest.approx(q_base * (1 + lam * math.tanh(rho_a - 1)), rel=1e-5)
        assert q[1].item() == 0.0


# --------------------------------------------------------------------------- AMSS / AMSS+


def _trained_amss(method: str, knobs: dict, epochs: int = 6):
    data = vector_data(48, dims={"a": 6, "b": 6}, informative=("a",))
    engine = Engine(data, method, {**VEC, "batch_size": 48, "lr": 0.3, "momentum": 0.9, **knobs})
    with record_steps(engine) as steps:
        metrics = [engine.train_epoch() for _ in range(epochs)]  # one step per epoch
    return data, engine, steps, metrics


@pytest.mark.parametrize("clamp", [False, True])
def test_amss_clamp_and_entropy_in_the_method(clamp):
    # ms_momentum 0: u = ξ of the step; τ small so that Eq. 4 saturates once 'a' is significant
    knobs = {"tau": 0.02, "ms_momentum": 0.0, "clamp": clamp, "entropy": "feature"}
    data, engine, steps, metrics = _trained_amss("amss", knobs)
    last, rec = metrics[-1], steps[-1]
    u = torch.tensor([last["method/u_a"], last["method/u_b"]], dtype=torch.float64)
    p = 1 - torch.softmax(u / 0.02, 0)  # Eq. 4
    assert float(p.min()) < 0.1  # unclamped, the dominant modality would update < 10%
    expected = p.clamp(0.1, 0.9) if clamp else p
    assert [last["method/p_a"], last["method/p_b"]] == pytest.approx(expected.tolist(), rel=1e-4, abs=1e-6)
    # entropy=feature: H(X^k) is the batch mean of the entropy of softmax(z^k) (the release's H)
    for m in data.modalities:
        logp = torch.log_softmax(rec["encoded"][m].double(), 1)
        hx = float(-(logp.exp() * logp).sum(1).mean())
        assert last[f"method/hx_{m}"] == pytest.approx(hx, rel=1e-5)
        assert last[f"method/xi_{m}"] == pytest.approx(last[f"method/mi_{m}"] / hx, rel=1e-4)

    # entropy=none: H = 1, ξ is the Barber-Agakov bound itself
    _, _, _, metrics = _trained_amss("amss", {**knobs, "entropy": "none"}, epochs=2)
    for m in data.modalities:
        assert metrics[-1][f"method/hx_{m}"] == 1.0
        assert metrics[-1][f"method/xi_{m}"] == pytest.approx(metrics[-1][f"method/mi_{m}"], rel=1e-6)


def _named_weight(model, layer) -> str:
    modality, path = layer.name.split("/", 1)
    return f"encoders.{modality}.{path}.weight"


@pytest.mark.parametrize("scope", ["modality", "layer"])
@pytest.mark.parametrize("plus_a", [0.5, 3.0])
def test_amss_plus_a_weights_kept_units_by_one_over_pi_plus_a_over_c(scope, plus_a):
    """AMSS+ (AMSS, Eqs. 5-6): a kept unit's gradient is scaled by 1/(π_j + a), a = plus_a/C_l
    with C_l the units of the unit's own layer; dropped units are zeroed."""
    data = vector_data(48, dims={"a": 6, "b": 6}, informative=("a",))
    knobs = {"plus_a": plus_a, "scope": scope, "ms_momentum": 0.0}
    engine = Engine(data, "amss_plus", {**VEC, "batch_size": 48, "lr": 0.1, **knobs})
    method = engine.method
    gen = torch.Generator()
    gen.set_state(method.rng.get_state())  # the method's draws, replayed below
    with record_steps(engine) as steps:
        engine.train_epoch()
    rec = steps[0]
    model = rec["model"]
    g = _plain_grads(rec)  # AMSS's loss is the fused CE; its gradient and Fisher, independently
    p = [engine.method.metrics()[f"p_{m}"] for m in data.modalities]
    checked = 0
    for k, m in enumerate(data.modalities):
        layers = method.layers[m]
        fisher = [g[_named_weight(model, layer)].square().sum(1).double() for layer in layers]
        sizes = [layer.units for layer in layers]
        if scope == "modality":
            f = torch.cat(fisher)
            w = f / f.sum() + IMPORTANCE_FLOOR / f.numel()
            n = math.ceil(p[k] * f.numel() - 1e-6)
            selected, pi = sample_units(w.float(), n, gen)
            a = torch.cat([torch.full((c,), plus_a / c) for c in sizes])
            scales = torch.split(torch.where(selected, 1 / (pi + a), torch.zeros_like(pi)), sizes)
        else:
            scales = []
            for f, c in zip(fisher, sizes):
                w = f / f.sum() + IMPORTANCE_FLOOR / c
                selected, pi = sample_units(w.float(), math.ceil(p[k] * c - 1e-6), gen)
                scales.append(torch.where(selected, 1 / (pi + plus_a / c), torch.zeros_like(pi)))
        for layer, scale in zip(layers, scales):
            name = _named_weight(model, layer)
            torch.testing.assert_close(rec["grads"][name], g[name] * scale[:, None], rtol=2e-3, atol=1e-8)
            checked += int((scale > 0).sum())
    assert checked > 10
