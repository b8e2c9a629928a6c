"""OGM-GE, OPM and OPM+OGM: coefficients, gradients, drop statistics, fusions, resume."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from tests.conftest import MICRO as TINY
from tunebal.engine import Engine
from tunebal.errors import ConfigError
from tunebal.methods import StepContext, get_method_class
from tunebal.methods._modulation import (
    discrepancy_ratios,
    ogm_coefficients,
    opm_probabilities,
)
from tunebal.metrics import discrepancy_ratios as metrics_discrepancy_ratios
from tunebal.metrics import true_class_scores
from tunebal.models import Encoded

torch.set_num_threads(1)

FAST = {"width": 4, "batch_size": 64}
FUSIONS = ("concat", "sum", "film", "gated")



# --------------------------------------------------------------------------- ρ, k, q by hand


def test_rho_hand_computed_and_matches_metrics():
    # two modalities, 2 samples, 2 classes; label 0 then 1
    labels = torch.tensor([0, 1])
    logits_a = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    logits_v = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    s_a = torch.tensor([1 / (1 + math.exp(-2)), 1 / (1 + math.exp(-1))])
    s_v = torch.tensor([0.5, 1 / (1 + math.exp(1))])
    scores = torch.stack([true_class_scores(logits_a, labels), true_class_scores(logits_v, labels)])
    torch.testing.assert_close(scores, torch.stack([s_a, s_v]))
    rho = discrepancy_ratios(scores)
    expected_a = float(s_a.sum() / s_v.sum())
    assert rho[0].item() == pytest.approx(expected_a, rel=1e-6)
    assert rho[1].item() == pytest.approx(1 / expected_a, rel=1e-6)
    assert expected_a > 1.5  # audio dominates this batch

    # M = 3 against the float implementation in tunebal.metrics (Eq. 7 averaged over j != m)
    gen = torch.Generator().manual_seed(3)
    s3 = torch.rand(3, 17, generator=gen)
    ref = metrics_discrepancy_ratios({"a": s3[0], "b": s3[1], "c": s3[2]})
    torch.testing.assert_close(discrepancy_ratios(s3), torch.tensor([ref["a"], ref["b"], ref["c"]]), rtol=1e-6, atol=0)
    sums = s3.sum(1)
    assert discrepancy_ratios(s3)[0].item() == pytest.approx(0.5 * float(sums[0] / sums[1] + sums[0] / sums[2]), rel=1e-6)
    # the modality with the smallest score sum never has ρ > 1
    assert discrepancy_ratios(s3)[int(sums.argmin())].item() <= 1.0


def test_ogm_coefficients_both_forms_by_hand():
    rho = torch.tensor([1.5, 1 / 1.5])
    k = ogm_coefficients(rho, alpha=0.8, form="tpami")
    assert k[0].item() == pytest.approx(1 - 0.8 * math.tanh(0.5), rel=1e-6)
    assert k[1].item() == 1.0
    k = ogm_coefficients(rho, alpha=0.8, form="cvpr")
    assert k[0].item() == pytest.approx(1 - math.tanh(0.8 * 1.5), rel=1e-6)
    assert k[1].item() == 1.0
    # clip at 0 (TPAMI form with a large α), and ρ = 1 exactly is not dominant
    k = ogm_coefficients(torch.tensor([3.0, 1.0, 0.2]), alpha=5.0, form="tpami")
    assert k.tolist() == [0.0, 1.0, 1.0]
    # CVPR form is discontinuous at 1: just above 1 it already modulates by 1 - tanh(α)
    k = ogm_coefficients(torch.tensor([1.0001]), alpha=0.8, form="cvpr")
    assert k.item() == pytest.approx(1 - math.tanh(0.8 * 1.0001), rel=1e-5)
    with pytest.raises(ConfigError):
        ogm_coefficients(rho, 0.8, form="nope")


def test_opm_probabilities_by_hand():
    q = opm_probabilities(torch.tensor([1.5, 1 / 1.5]), q_base=0.5, lam=0.5)
    assert q[0].item() == pytest.approx(0.5 * (1 + 0.5 * math.tanh(0.5)), rel=1e-6)
    assert q[1].item() == 0.0
    # clipped to 1
    q = opm_probabilities(torch.tensor([4.0, 1.0]), q_base=0.9, lam=5.0)
    assert q.tolist() == [1.0, 0.0]


# --------------------------------------------------------------------------- OGM gradients


def _capture_step(engine: Engine) -> tuple[dict[str, torch.Tensor], StepContext, dict, torch.Tensor]:
    """Run one real ``train_step`` on the first training batch; return the gradients the
    optimiser saw (after ``after_backward``), the context, the batch and the parameters before."""
    grads: dict[str, torch.Tensor] = {}
    opt = engine.optimizer
    original = opt.step

    def step(*args, **kwargs):
        for name, p in engine.model.named_parameters():
            if p.grad is not None:
                grads[name] = p.grad.detach().clone()
        return original(*args, **kwargs)

    opt.step = step
    try:
        inputs, labels = next(engine.iterate(engine.data.train, shuffle=True))
        ctx = engine.train_step(inputs, labels)
    finally:
        opt.step = original
    return grads, ctx, inputs, labels


def _expected_rho(engine: Engine, inputs, labels) -> dict[str, float]:
    """ρ recomputed independently: zero the other features by hand and call the head."""
    model = copy.deepcopy(engine.model)  # train-mode BatchNorm would update the engine's buffers
    with torch.no_grad():
        feats = model.encode(inputs).features
        scores = {}
        for m in model.modalities:
            masked = {j: (z if j == m else torch.zeros_like(z)) for j, z in feats.items()}
            scores[m] = true_class_scores(model.head(masked), labels)
    return metrics_discrepancy_ratios(scores)


@pytest.mark.parametrize("form,alpha", [("tpami", 1.0), ("cvpr", 0.8)])
def test_ogm_scales_only_the_dominant_encoder(data2, form, alpha):
    config = {**FAST, "seed": 5}
    base = Engine(data2, "baseline", config, device="cpu")
    ogm = Engine(data2, "ogm", {**config, "alpha": alpha, "form": form, "ge": False, "start": 1}, device="cpu")
    # epoch 0 is outside OGM's window, so both train identically; by epoch 1 audio dominates
    # clearly (at random init ρ ≈ 1 and the TPAMI k would be ≈ 1, testing nothing)
    base.train_epoch()
    ogm.train_epoch()
    for (n1, p1), (n2, p2) in zip(base.model.named_parameters(), ogm.model.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2)
    batch_inputs, batch_labels = next(base.iterate(base.data.train, shuffle=True))
    rho = _expected_rho(base, batch_inputs, batch_labels)  # same model in both engines
    g_base, _, _, _ = _capture_step(base)
    g_ogm, _, _, _ = _capture_step(ogm)
    k = ogm_coefficients(torch.tensor([rho[m] for m in data2.modalities]), alpha, form)
    assert min(k.tolist()) < 0.999  # one modality is modulated
    assert sorted(k.tolist())[-1] == 1.0  # the other is not
    n_checked = {"encoder": 0, "head": 0}
    for name, gb in g_base.items():
        go = g_ogm[name]
        if name.startswith("encoders."):
            m = name.split(".")[1]
            km = k[data2.modalities.index(m)]
            torch.testing.assert_close(go, gb * km, rtol=1e-5, atol=1e-7)
            if km == 1.0:
                assert torch.equal(go, gb)
            n_checked["encoder"] += 1
        else:  # fusion and classifier are untouched
            assert torch.equal(go, gb), name
            n_checked["head"] += 1
    assert n_checked["encoder"] > 4 and n_checked["head"] >= 2


def test_ogm_window_and_ge_noise(data2):
    config = {**FAST, "seed": 2}
    g_base, _, inputs, labels = _capture_step(Engine(data2, "baseline", config, device="cpu"))
    # outside the window (starts at epoch 1): plain joint training
    g_off, _, _, _ = _capture_step(Engine(data2, "ogm", {**config, "start": 1}, device="cpu"))
    assert all(torch.equal(g_off[n], g) for n, g in g_base.items())
    with pytest.raises(ConfigError):
        Engine(data2, "ogm", {**config, "start": 3, "end": 2}, device="cpu")

    base = Engine(data2, "baseline", config, device="cpu")
    rho = _expected_rho(base, inputs, labels)
    # CVPR form: k ≈ 0.34 for the dominant encoder, so "std of the unmodulated gradient" is
    # distinguishable from the std of k·g
    k = ogm_coefficients(torch.tensor([rho[m] for m in data2.modalities]), 0.8, "cvpr")
    assert min(k.tolist()) < 0.5
    for scope in ("all", "modulated"):
        knobs = {"ge": True, "ge_scope": scope, "form": "cvpr", "alpha": 0.8}
        g_ge, _, _, _ = _capture_step(Engine(data2, "ogm", {**config, **knobs}, device="cpu"))
        for name, gb in g_base.items():
            if not name.startswith("encoders."):
                assert torch.equal(g_ge[name], gb)
                continue
            km = k[data2.modalities.index(name.split(".")[1])]
            noise = g_ge[name] - km * gb
            if scope == "modulated" and km == 1.0:
                assert torch.equal(g_ge[name], gb)
            elif gb.numel() >= 2000:  # per-tensor std of h equals the unmodulated gradient's std
                ratio = float(noise.std() / gb.std())
                assert 0.9 < ratio < 1.1, (name, ratio)
                assert abs(float(noise.mean())) < 0.1 * float(gb.std())


def test_ogm_conv_only_leaves_non_conv_params(data2):
    config = {**FAST, "seed": 1}
    g_base, _, _, _ = _capture_step(Engine(data2, "baseline", config, device="cpu"))
    g, _, _, _ = _capture_step(Engine(data2, "ogm", {**config, "form": "cvpr", "conv_only": True, "ge": False}, device="cpu"))
    changed_conv = 0
    for name, gb in g_base.items():
        if gb.dim() != 4:
            assert torch.equal(g[name], gb), name
        elif not torch.equal(g[name], gb):
            changed_conv += 1
    assert changed_conv >= 4  # the dominant encoder's 4 conv kernels


# --------------------------------------------------------------------------- OPM drop statistics


class _StubModel:
    """Just enough of MultimodalModel for the OPM hook: fixed zero-out logits per modality."""

    def __init__(self, modalities, logits):
        self.modalities = modalities
        self.logits = logits

    def unimodal_logits(self, features):
        return dict(self.logits)


def _opm_step(method, model, labels, dim=4, epoch=0):
    b = labels.shape[0]
    feats = {m: torch.ones(b, dim) for m in model.modalities}
    ctx = StepContext(model=model, inputs={}, labels=labels, epoch=epoch, step=0, encoded=Encoded(features=feats))
    return method.before_fusion(ctx)


def _logits(batch: int, classes: int, confident: bool) -> torch.Tensor:
    lg = torch.zeros(batch, classes)
    if confident:
        lg[:, 0] = 5.0  # labels are 0: s = e^5/(e^5+K-1)
    return lg


def _new_opm(modalities, **knobs):
    cls = get_method_class("opm")
    return cls(cls.KNOBS.resolve(knobs), modalities, 8, seed=11)


def test_opm_drop_rate_matches_q_and_weak_is_never_dropped():
    mods = ("audio", "visual")
    b, k, steps = 64, 8, 150
    labels = torch.zeros(b, dtype=torch.long)
    model = _StubModel(mods, {"audio": _logits(b, k, True), "visual": _logits(b, k, False)})
    s_a = math.exp(5) / (math.exp(5) + k - 1)
    rho_a = s_a / (1 / k)
    q_expected = 0.5 * (1 + 0.5 * math.tanh(rho_a - 1))
    opm = _new_opm(mods, q_base=0.5, lam=0.5)
    first = _opm_step(opm, model, labels)
    assert all(torch.equal(z, torch.ones_like(z)) for z in first.values())  # no previous ρ: q = 0
    dropped = 0
    for _ in range(steps):
        out = _opm_step(opm, model, labels)
        row_zero = (out["audio"] == 0).all(dim=1)
        assert ((out["audio"] == 1).all(dim=1) | row_zero).all()  # whole feature dropped or kept
        dropped += int(row_zero.sum())
        assert torch.equal(out["visual"], torch.ones_like(out["visual"]))  # weak: never dropped
    n = steps * b
    rate = dropped / n
    sd = math.sqrt(q_expected * (1 - q_expected) / n)
    assert abs(rate - q_expected) < 4 * sd, (rate, q_expected, sd)
    assert opm.q[0].item() == pytest.approx(q_expected, rel=1e-5) and opm.q[1].item() == 0.0


def test_opm_uses_previous_step_rho_rescale_and_p_exe():
    mods = ("audio", "visual")
    b, k = 256, 8
    labels = torch.zeros(b, dtype=torch.long)
    audio_dom = _StubModel(mods, {"audio": _logits(b, k, True), "visual": _logits(b, k, False)})
    visual_dom = _StubModel(mods, {"audio": _logits(b, k, False), "visual": _logits(b, k, True)})
    opm = _new_opm(mods, q_base=0.4, lam=0.5, rescale=True)
    _opm_step(opm, audio_dom, labels)  # step 0 sets q from audio dominance
    q_a = opm.q[0].item()
    out = _opm_step(opm, visual_dom, labels)  # step 1: visual now dominates, but q is last step's
    d_a, d_v = out["audio"].shape[1], out["visual"].shape[1]
    theta = d_a * q_a / (d_a + d_v)  # the release's global θ = Σ d_m q_m / Σ d_m (q_visual = 0)
    factor = 1 / (1 - theta)
    torch.testing.assert_close(out["visual"], torch.full_like(out["visual"], factor))  # every modality rescaled
    kept = out["audio"][(out["audio"] != 0).all(dim=1)]
    assert kept.shape[0] < b
    torch.testing.assert_close(kept, torch.full_like(kept, factor))  # by the one global factor, not 1/(1-q_a)
    out = _opm_step(opm, visual_dom, labels)  # step 2: now the visual feature is dropped
    assert (out["audio"] != 0).all()
    assert (out["visual"] == 0).all(dim=1).any()

    # p_exe: a batch is either untouched or modulated; the fraction modulated is about p_exe
    opm = _new_opm(mods, q_base=0.9, lam=0.5, p_exe=0.3)
    executed = 0
    steps = 300
    _opm_step(opm, audio_dom, labels)
    for _ in range(steps):
        out = _opm_step(opm, audio_dom, labels)
        executed += int((out["audio"] == 0).any())
    sd = math.sqrt(0.3 * 0.7 / steps)
    assert abs(executed / steps - 0.3) < 4 * sd

    # warm-up: nothing dropped, but q is tracked
    opm = _new_opm(mods, warmup=1)
    for _ in range(3):
        out = _opm_step(opm, audio_dom, labels, epoch=0)
        assert torch.equal(out["audio"], torch.ones_like(out["audio"]))
    assert opm.q[0].item() > 0.5
    out = _opm_step(opm, audio_dom, labels, epoch=1)
    assert (out["audio"] == 0).all(dim=1).any()


def test_opm_three_modalities_never_drops_every_modality():
    mods = ("audio", "visual", "text")
    b, k = 128, 8
    labels = torch.zeros(b, dtype=torch.long)
    # audio and visual both dominate text (ρ > 1 for both): both can be dropped, text never
    model = _StubModel(mods, {"audio": _logits(b, k, True), "visual": _logits(b, k, True), "text": _logits(b, k, False)})
    opm = _new_opm(mods, q_base=0.9, lam=1.0)
    both = 0
    for _ in range(50):
        out = _opm_step(opm, model, labels)
        assert torch.equal(out["text"], torch.ones_like(out["text"]))
        both += int(((out["audio"] == 0).all(1) & (out["visual"] == 0).all(1)).sum())
    assert both > 0  # two modalities dropped together does happen; all three never


def test_opm_masks_reproducible_from_state():
    mods = ("audio", "visual")
    b = 64
    labels = torch.zeros(b, dtype=torch.long)
    model = _StubModel(mods, {"audio": _logits(b, 8, True), "visual": _logits(b, 8, False)})
    a = _new_opm(mods)
    for _ in range(3):
        _opm_step(a, model, labels)
    state = a.state_dict()
    b2 = _new_opm(mods)
    b2.load_state_dict(state)
    for _ in range(3):
        assert torch.equal(_opm_step(a, model, labels)["audio"], _opm_step(b2, model, labels)["audio"])


# --------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("method", ["ogm", "opm", "opm_ogm"])
@pytest.mark.parametrize("fusion", FUSIONS)
def test_trains_one_epoch_with_every_fusion(data2, method, fusion):
    engine = Engine(data2, method, {**FAST, "fusion": fusion, "seed": 0}, device="cpu")
    before = [p.detach().clone() for p in engine.model.parameters()]
    metrics = engine.run_epoch()
    assert math.isfinite(metrics["train/loss"]) and 0.0 <= metrics["val/acc"] <= 1.0
    assert any(not torch.equal(a, b) for a, b in zip(before, engine.model.parameters()))
    for m in data2.modalities:
        assert f"method/rho_{m}" in metrics
        if method != "opm":
            assert 0.0 <= metrics[f"method/k_{m}"] <= 1.0
        if method != "ogm":
            assert 0.0 <= metrics[f"method/q_{m}"] <= 1.0


@pytest.mark.parametrize("method", ["ogm", "opm", "opm_ogm"])
def test_trains_with_three_modalities(data3, method):
    metrics = Engine(data3, method, {**FAST, "seed": 0}, device="cpu").run_epoch()
    assert math.isfinite(metrics["train/loss"])
    assert {f"method/rho_{m}" for m in ("audio", "visual", "text")} <= set(metrics)


@pytest.mark.parametrize("method", ["ogm", "opm", "opm_ogm"])
def test_single_modality_is_a_config_error(method):
    with pytest.raises(ConfigError, match="at least 2"):
        get_method_class(method).check_compatible(1, "concat")


@pytest.mark.parametrize("method,knobs", [("ogm", {"ge": True}), ("opm", {"p_exe": 0.7, "rescale": True}), ("opm_ogm", {})])
def test_resume_is_bit_exact(data2, tmp_path, method, knobs):
    config = {**FAST, "seed": 4, "epochs": 2, **knobs}
    straight = Engine(data2, method, config, device="cpu")
    straight.run_epoch()
    m_straight = straight.run_epoch()

    first = Engine(data2, method, config, device="cpu")
    first.run_epoch()
    path = str(tmp_path / f"{method}.arrow")
    first.save(path)
    resumed = Engine(data2, method, config, device="cpu")
    resumed.load(path)
    if method != "ogm":
        assert torch.equal(resumed.method.state_dict()["q"], first.method.state_dict()["q"])
        assert resumed.method.state_dict()["q"].abs().sum() > 0  # q is live state, not zeros
    m_resumed = resumed.run_epoch()
    for key, value in m_straight.items():
        if key.startswith("time/"):
            continue
        assert m_resumed[key] == value, key
    for p1, p2 in zip(straight.model.parameters(), resumed.model.parameters()):
        assert torch.equal(p1, p2)


def test_benchmark_run_reports_every_entry(data2):
    from tunebal.bench.methods import markdown_table, parse_entry, run

    assert parse_entry("ogm:alpha=0.5:form=cvpr") == ("ogm:alpha=0.5:form=cvpr", "ogm", {"alpha": "0.5", "form": "cvpr"})
    with pytest.raises(ConfigError):
        parse_entry("nope:alpha=1")
    with pytest.raises(ConfigError, match="no benchmarked method declares"):
        run(["ogm"], 1, 1, {"q_base": 0.3}, TINY, log=None)
    results = run(["ogm:alpha=0.5:form=cvpr"], [3], 1, {**FAST, "alpha": 0.9}, TINY, log=None)
    assert [r["label"] for r in results] == ["baseline", "ogm:alpha=0.5:form=cvpr"]  # baseline added first
    assert results[0]["step_ratio"] == 1.0
    run_cfg = results[1]["runs"][0]["config"]
    assert run_cfg["alpha"] == 0.5 and run_cfg["form"] == "cvpr" and run_cfg["seed"] == 3  # entry beats --set
    for r in results:
        assert 0.0 <= r["test_acc"][0] <= 1.0 and {"acc_audio", "acc_visual", "rho_dominant"} <= set(r)
    assert "`ogm:alpha=0.5:form=cvpr`" in markdown_table(results)
