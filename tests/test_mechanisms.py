"""The balancing mechanisms end to end inside the methods, against independent computations.

* OPM drops each modality with its own probability, independently (OPM/OGM, TPAMI 2024, §3.2.1:
  "drop each modality with probability q");
* OPM+OGM's OGM half takes ρ from the unmodified features, not the dropped ones;
* ARL's encoder gradient is (1 + a)·∇(CE_fused + γ·Σ CE_m) (ARL, Eqs. 18-22), with the unimodal
  terms back-propagated through the encoders;
* AMSS's selection frequencies inside the method follow the Fisher importance (AMSS, §III-B).

Statistical checks are seeded (deterministic) and their tolerances are derived from the
sampling distribution of the estimate, stated at each assert.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tests._builders import VEC, autograd_grads, record_steps, vector_data, zero_out
from tunebal.engine import Engine
from tunebal.methods import StepContext, get_method_class
from tunebal.methods._modulation import ogm_coefficients
from tunebal.metrics import discrepancy_ratios, true_class_scores
from tunebal.models import Encoded

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")


def _rho(logits: dict[str, torch.Tensor], labels: torch.Tensor) -> dict[str, float]:
    return discrepancy_ratios({m: true_class_scores(lg.detach(), labels) for m, lg in logits.items()})


# --------------------------------------------------------------------------- OPM: independent draws


class _FixedLogits:
    """Stands in for the model in OPM's hook: fixed zero-out logits per modality."""

    def __init__(self, logits: dict[str, torch.Tensor]) -> None:
        self.modalities = tuple(logits)
        self.logits = logits

    def unimodal_logits(self, features):
        return dict(self.logits)


def test_opm_drops_each_modality_by_its_own_independent_draw():
    # three modalities: audio and visual both dominate text (ρ > 1), with different ρ, so both
    # have a drop probability (q_a > q_v > 0) and text has none
    mods, b, k = ("audio", "visual", "text"), 256, 4
    labels = torch.zeros(b, dtype=torch.long)
    conf = {"audio": 3.0, "visual": 1.5, "text": 0.0}
    logits = {m: torch.zeros(b, k).index_fill_(1, torch.tensor([0]), c) for m, c in conf.items()}
    s = {m: math.exp(c) / (math.exp(c) + k - 1) for m, c in conf.items()}
    rho = {m: 0.5 * sum(s[m] / s[j] for j in mods if j != m) for m in mods}  # Eq. 7, M = 3
    q = {m: min(1.0, 0.5 * (1 + 0.5 * math.tanh(rho[m] - 1))) if rho[m] > 1 else 0.0 for m in mods}  # Eq. 8
    assert q["audio"] > q["visual"] > 0 and q["text"] == 0

    cls = get_method_class("opm")
    opm = cls(cls.KNOBS.resolve({"q_base": 0.5, "lam": 0.5}), mods, k, seed=3)
    model = _FixedLogits(logits)
    drops = []
    for step in range(81):
        feats = {m: torch.ones(b, 2) for m in mods}
        ctx = StepContext(model=model, inputs={}, labels=labels, epoch=0, step=step, encoded=Encoded(features=feats))
        out = opm.before_fusion(ctx)
        if step:  # step 0 has no previous ρ, so q = 0
            drops.append(torch.stack([(out[m] == 0).all(1) for m in mods]))
    d = torch.cat(drops, dim=1).double()  # (3, N) per-sample drop indicators
    n = d.shape[1]  # 80 steps × 256 samples = 20480 Bernoulli draws per modality
    assert d[2].sum() == 0  # text, the weakest, is never dropped
    for i, m in enumerate(("audio", "visual")):  # marginal rates: binomial, 5 standard errors
        se = math.sqrt(q[m] * (1 - q[m]) / n)
        assert abs(float(d[i].mean()) - q[m]) < 5 * se, (m, float(d[i].mean()), q[m])
    # joint rate of "both dropped" is the product q_a·q_v for independent draws (binomial with
    # p = q_a·q_v: 5 standard errors ≈ 0.017). One shared uniform per sample gives min(q) = q_v
    # (≈ 0.54 here, 40 standard errors away); a per-batch draw would make whole batches agree.
    p_both = q["audio"] * q["visual"]
    se_both = math.sqrt(p_both * (1 - p_both) / n)
    both = float((d[0] * d[1]).mean())
    assert abs(both - p_both) < 5 * se_both, (both, p_both, se_both)
    assert abs(q["visual"] - p_both) > 20 * se_both  # the test can tell the shared-draw bug apart
    # per sample, not per batch: the spread of the per-step drop fractions of audio is binomial
    # (sd √(q(1-q)/256) ≈ 0.03); whole-batch drops would give a spread of ≈ 0.5
    per_step = torch.stack(drops)[:, 0].double().mean(1)
    assert float(per_step.std()) < 2 * math.sqrt(q["audio"] * (1 - q["audio"]) / b)


# --------------------------------------------------------------------------- OPM+OGM: ρ of the unmodified features


def test_opm_ogm_takes_ogm_rho_from_the_unmodified_features():
    data = vector_data(48, dims={"a": 6, "b": 6}, informative=("a",))
    knobs = {"q_base": 0.6, "lam": 0.5, "form": "cvpr", "alpha": 0.8, "ge": False}
    engine = Engine(data, "opm_ogm", {**VEC, "batch_size": 48, "lr": 0.2, "momentum": 0.9, **knobs})
    with record_steps(engine) as steps:
        for _ in range(6):  # one step per epoch; by the last one the informative 'a' dominates
            engine.train_epoch()
    rec = steps[-1]
    # a sample's feature is either kept as encoded or zeroed (rescale is off)
    kept = {m: (rec["features"][m] == rec["encoded"][m]).all(1) for m in data.modalities}
    assert all(bool(((rec["features"][m] == 0).all(1) | kept[m]).all()) for m in data.modalities)
    n_dropped = sorted(int((~kept[m]).sum()) for m in data.modalities)
    assert n_dropped[0] == 0 and 0 < n_dropped[1] < 48  # the last step's dominant modality is dropped

    model, x, y = rec["model"], rec["inputs"], rec["labels"]
    feats = model.encode(x).features
    keep = {m: kept[m].float()[:, None] for m in data.modalities}
    loss = F.cross_entropy(model.head({m: feats[m] * keep[m] for m in feats}), y)
    g = autograd_grads(model, loss)  # the gradient of the dropped forward pass
    rho = _rho(zero_out(model, feats), y)  # ρ of the unmodified features
    k = ogm_coefficients(torch.tensor([rho[m] for m in data.modalities]), 0.8, "cvpr")
    rho_dropped = _rho(zero_out(model, {m: feats[m] * keep[m] for m in feats}), y)
    k_dropped = ogm_coefficients(torch.tensor([rho_dropped[m] for m in data.modalities]), 0.8, "cvpr")
    assert float((k - k_dropped).abs().max()) > 0.02  # the two readings of ρ give different k
    for name, expected in g.items():
        if name.startswith("encoders."):
            expected = expected * k[data.modalities.index(name.split(".")[1])]
        torch.testing.assert_close(rec["grads"][name], expected, rtol=1e-4, atol=1e-7)


# --------------------------------------------------------------------------- ARL: the encoder gradient


def _arl_coefficients_by_hand(uni: dict[str, torch.Tensor], y: torch.Tensor, T: float, d_reduce: str) -> list[float]:
    """Eq. 17 (inverse batch-mean entropy), Eq. 4 (dependency ratio) and Eq. 18, M = 2."""
    m0, m1 = list(uni)
    p = {m: torch.softmax(uni[m].detach().double(), 1) for m in uni}
    h = {m: float(-(p[m] * p[m].log()).sum(1).mean()) for m in uni}
    s = {m: p[m].gather(1, y[:, None]).squeeze(1) for m in uni}
    q_ratio = (1 / h[m0]) / (1 / h[m1])
    d_ratio = float(s[m0].sum() / s[m1].sum()) if d_reduce == "ratio_of_means" else float((s[m0] / s[m1]).mean())
    e0, e1 = math.exp(T * q_ratio), math.exp(T * d_ratio)
    return [e0 / (e0 + e1), e1 / (e0 + e1)]


@pytest.mark.parametrize(
    "knobs",
    [
        {},
        {"residual": False},
        {"d_reduce": "mean_of_ratios", "T": 8.0, "gamma": 2.5},
        {"modulate": False},
    ],
    ids=["default", "residual_off", "mean_of_ratios", "modulate_off"],
)
def test_arl_encoder_gradient_is_the_scaled_autograd_gradient_of_eq22(knobs):
    data = vector_data(40, dims={"a": 6, "b": 6}, informative=("a",))
    cfg = {"gamma": 4.0, "T": 4.0, **knobs}
    engine = Engine(data, "arl", {**VEC, "batch_size": 40, "lr": 0.1, **cfg})
    with record_steps(engine) as steps:
        engine.train_epoch()
    rec = steps[0]
    model, x, y = rec["model"], rec["inputs"], rec["labels"]
    feats = model.encode(x).features
    uni = zero_out(model, feats)
    fused = F.cross_entropy(model.head(feats), y)
    loss = fused + cfg["gamma"] * sum(F.cross_entropy(uni[m], y) for m in data.modalities)  # Eq. 22
    g = autograd_grads(model, loss)
    a = _arl_coefficients_by_hand(uni, y, cfg["T"], cfg.get("d_reduce", "ratio_of_means"))
    assert abs(a[0] - 0.5) > 0.01  # a real asymmetry on this batch
    for name, expected in g.items():
        if name.startswith("encoders.") and cfg.get("modulate", True):
            a_m = a[data.modalities.index(name.split(".")[1])]
            expected = expected * ((1 + a_m) if cfg.get("residual", True) else a_m)  # Eqs. 19-20
        torch.testing.assert_close(rec["grads"][name], expected, rtol=1e-4, atol=1e-7)
    # power: with the unimodal logits detached the encoder gradient would be far off
    g_detached = autograd_grads(model, fused + cfg["gamma"] * sum(F.cross_entropy(uni[m].detach(), y) for m in uni))
    enc = [n for n in g if n.startswith("encoders.")]
    diff = math.sqrt(sum(float((g[n] - g_detached.get(n, 0 * g[n])).square().sum()) for n in enc))
    norm = math.sqrt(sum(float(g[n].square().sum()) for n in enc))
    assert diff > 0.2 * norm


# --------------------------------------------------------------------------- AMSS: selection follows the Fisher


def _unit_fisher(model, loss, layers) -> torch.Tensor:
    """Per-unit squared batch gradient (row sums over each masked weight), computed on ``model``.

    ``layers`` are the method's mask layers (named ``<modality>/<module path>``); the vector
    encoders' linear layers have no bias, so a unit is one weight row.
    """
    named = dict(model.named_parameters())
    params = []
    for layer in layers:
        modality, path = layer.name.split("/", 1)
        params.append(named[f"encoders.{modality}.{path}.weight"])
        assert layer.bias is None
    grads = torch.autograd.grad(loss, params, retain_graph=True)
    return torch.cat([g.square().reshape(g.shape[0], -1).sum(1) for g in grads])


def _per_sample_unit_fisher(model, x, y, modality) -> torch.Tensor:
    """Exact diagonal empirical Fisher per unit of one vector encoder from per-sample shares.

    A manual forward through the Linear-BN-ReLU blocks keeps each linear layer's input a and
    output u; with δ = ∂L/∂u of the batch-mean loss L, sample i's share of the weight gradient
    is B·δ_i ⊗ a_i and F = (1/B) Σ_i (B·δ_i ⊗ a_i)² (AMSS §III-B 2), summed over each row.
    """
    inputs, outputs, feats = {}, {}, {}
    for m in model.modalities:
        h = x[m]
        for d, block in enumerate(model.encoders[m].blocks):
            linear, norm, act = block
            a = h
            u = linear(a)
            if m == modality:
                inputs[d], outputs[d] = a, u
            h = act(norm(u))
        feats[m] = h
    loss = F.cross_entropy(model.head(feats), y)
    deltas = torch.autograd.grad(loss, [outputs[d] for d in sorted(outputs)])
    b = y.shape[0]
    out = []
    for d, delta in zip(sorted(outputs), deltas):
        per_sample = b * delta[:, :, None] * inputs[d][:, None, :]  # (B, out, in)
        out.append(per_sample.square().mean(0).sum(1))
    return torch.cat(out).detach()


@pytest.mark.parametrize(
    "source,fisher", [("fused", "batch"), ("unimodal", "batch"), ("fused", "per_sample")]
)
def test_amss_selection_frequencies_in_the_method_follow_the_fisher(source, fisher):
    data = vector_data(64, dims={"a": 6, "b": 6}, informative=("a",))
    knobs = {"fisher_source": source, "fisher": fisher, "ms_momentum": 0.0}
    engine = Engine(data, "amss", {**VEC, "batch_size": 64, "lr": 0.1, **knobs})
    method, model = engine.method, engine.model
    with record_steps(engine) as steps:
        engine.train_epoch()
    rec = steps[0]
    # replay the recorded step's gradients through the method's masking, many times
    model.load_state_dict(rec["model"].state_dict())
    model.train()
    ctx = StepContext(model=model, inputs=rec["inputs"], labels=rec["labels"], epoch=0, step=0)
    ctx.encoded = model.encode(ctx.inputs)
    ctx.features = method.before_fusion(ctx)
    ctx.logits = model.head(ctx.features)
    method.u = None
    ctx.loss = method.loss(ctx)
    engine.optimizer.zero_grad(set_to_none=True)
    ctx.loss.backward()
    full = {p: p.grad.clone() for p in model.parameters()}
    uni_grads = method._unimodal_grads  # what the loss hook prepared; after_backward consumes it
    ps = method.per_sample
    captured = (dict(ps.inputs), dict(ps.grads)) if ps is not None else None

    # independent Fisher from a fresh copy: the fused CE, or Σ_m CE of the zero-out logits
    ref = rec["model"]
    feats = ref.encode(rec["inputs"]).features
    y = rec["labels"]
    if source == "fused":
        loss, other = F.cross_entropy(ref.head(feats), y), None
    else:
        uni = zero_out(ref, feats)
        loss = sum(F.cross_entropy(uni[m], y) for m in data.modalities)
        other = F.cross_entropy(ref.head(feats), y)
    draws, ref_draws = 2000, 30000
    gen = torch.Generator().manual_seed(123)
    tested = 0
    for k, mod in enumerate(data.modalities):
        layers = method.layers[mod]
        if fisher == "per_sample":
            weights = _per_sample_unit_fisher(ref, rec["inputs"], y, mod)
        else:
            weights = _unit_fisher(ref, loss, layers)
        w = weights / weights.sum()
        n_keep = math.ceil(float(method.p[k]) * w.numel() - 1e-6)
        assert 2 <= n_keep <= w.numel() - 2
        # reference inclusion frequencies: torch.multinomial without replacement, P ∝ Fisher
        ref_sel = torch.zeros(ref_draws, w.numel())
        ref_sel.scatter_(1, torch.multinomial(w.expand(ref_draws, -1), n_keep, replacement=False, generator=gen), 1.0)
        f_ref = ref_sel.mean(0).double()
        counts = torch.zeros(w.numel(), dtype=torch.float64)
        for _ in range(draws):
            for p, g in full.items():
                p.grad = g.clone()
            method._unimodal_grads = uni_grads
            if captured is not None:
                ps.inputs.update(captured[0])
                ps.grads.update(captured[1])
            method.after_backward(ctx)
            counts += torch.cat([(layer.weight.grad.reshape(layer.units, -1) != 0).any(1) for layer in layers]).double()
        f = counts / draws
        assert bool((torch.cat([full[layer.weight].reshape(layer.units, -1).abs().sum(1) for layer in layers]) > 0).all())
        # two-sample binomial test per unit: 5 standard errors of the difference of two frequencies
        se = torch.sqrt(f_ref * (1 - f_ref) * (1 / draws + 1 / ref_draws)).clamp_min(1e-3)
        z = (f - f_ref) / se
        assert bool((z.abs() < 5).all()), (mod, z)
        assert abs(float(f.sum()) - n_keep) < 1e-9  # exactly ⌈p·N⌉ units every draw
        tested += w.numel()
        # power: importance from the other likelihood (or uniform) gives visibly other frequencies
        if fisher == "per_sample":  # the squared batch gradient instead
            alt = _unit_fisher(ref, loss, layers)
        else:
            alt_loss = other if other is not None else sum(F.cross_entropy(u, y) for u in zero_out(ref, feats).values())
            alt = _unit_fisher(ref, alt_loss, layers)
        alt_sel = torch.zeros(ref_draws, w.numel())
        alt_sel.scatter_(1, torch.multinomial((alt / alt.sum()).expand(ref_draws, -1), n_keep, replacement=False, generator=gen), 1.0)
        # (beyond the 5-standard-error acceptance band above, so these would have failed it)
        assert float(((alt_sel.mean(0).double() - f_ref).abs() / se).max()) > 6.5
        assert float(((n_keep / w.numel() - f_ref).abs() / se).max()) > 6.5  # and uniform selection
    assert tested == 48  # 2 encoders × (4 + 4 + 8 + 8) channel units
