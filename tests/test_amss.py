"""AMSS / AMSS+ (AMSS (TPAMI 2025) §III): significance, update ratios, mask counts, sampling, unbiasedness,
training with every fusion and 3 modalities, bit-exact resume, search spaces, attention-head units
(Transformer encoders), classifier masking (mask_parts, §IV-C3 / Table VII)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tunebal.data import build_dataset
from tunebal.data.base import MultimodalData, Split
from tunebal.engine import Engine
from tunebal.errors import ConfigError
from tunebal.methods import StepContext
from tunebal.methods._amss_mask import (
    PerSampleFisher,
    exact_inclusion_probabilities,
    find_mask_layers,
    importance_weights,
    layer_fisher_from_grad,
    sample_units,
    units_to_keep,
)
from tunebal.methods.amss import modal_significance, update_ratios
from tunebal.models.encoders import transformer_encoder

CFG = {"width": 4, "batch_size": 32, "lr": 0.05}


def _strip_times(m):
    return {k: v for k, v in m.items() if not k.startswith("time/")}


# --------------------------------------------------------------------------- Eqs. 2-4


def test_modal_significance_matches_hand_computation():
    labels = torch.tensor([0, 1, 1, 2])
    logits = {
        "a": torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 3.0, 1.0], [1.0, 1.0, 1.0]]),
        "v": torch.tensor([[3.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 4.0]]),
    }
    feats = {"a": torch.tensor([[1.0, 0.0], [0.0, 0.0], [2.0, 0.0], [0.0, 3.0]]), "v": torch.zeros(4, 2)}

    def log_softmax(row, j):
        return row[j] - math.log(sum(math.exp(r) for r in row))

    def entropy(row):
        z = sum(math.exp(r) for r in row)
        return -sum(math.exp(r) / z * math.log(math.exp(r) / z) for r in row)

    h_y = -(0.25 * math.log(0.25) * 2 + 0.5 * math.log(0.5))  # labels 1/4, 1/2, 1/4
    expect = {}
    for m in ("a", "v"):
        rows = logits[m].tolist()
        bound = h_y + sum(log_softmax(r, int(y)) for r, y in zip(rows, labels)) / 4
        hx = sum(entropy(r) for r in feats[m].tolist()) / 4
        expect[m] = (max(bound, 0.0), hx)
    assert expect["a"][0] > 0 and expect["v"][0] > 0  # both bounds positive for these logits

    xi, mi, hx = modal_significance(logits, feats, labels, 3, "feature")
    for k, m in enumerate(("a", "v")):
        assert mi[k].item() == pytest.approx(expect[m][0], rel=1e-5)
        assert hx[k].item() == pytest.approx(expect[m][1], rel=1e-5)
        assert xi[k].item() == pytest.approx(expect[m][0] / expect[m][1], rel=1e-5)
    assert hx[1].item() == pytest.approx(math.log(2))  # all-zero feature: uniform softmax

    xi_none, mi_none, _ = modal_significance(logits, feats, labels, 3, "none")
    assert torch.allclose(xi_none, mi_none)  # H = 1: ξ is the MI bound
    # a useless predictor (uniform logits) gives a negative bound -> floored at 0 (MI >= 0)
    xi0, mi0, _ = modal_significance({"a": torch.zeros(4, 3), "v": logits["v"]}, feats, labels, 3)
    assert mi0[0].item() == 0.0 and xi0[0].item() == 0.0


def test_momentum_and_update_ratio_eq3_eq4(tiny_data):
    engine = Engine(tiny_data, "amss", {**CFG, "ms_momentum": 0.75, "tau": 0.5})
    method = engine.method
    xis = [torch.tensor([0.4, 0.1]), torch.tensor([0.2, 0.3])]
    u = None
    for xi in xis:  # Eq. 3 with u initialised by the first ξ
        u = xi.clone() if u is None else 0.75 * u + 0.25 * xi
    assert torch.allclose(u, torch.tensor([0.35, 0.15]))
    # Eq. 4, M = 2: p_a = 1 - e^{0.7}/(e^{0.7}+e^{0.3}) = 1/(1+e^{0.4})
    p = update_ratios(u, 0.5)
    assert p[0].item() == pytest.approx(1 / (1 + math.exp(0.4)), rel=1e-6)
    assert p.sum().item() == pytest.approx(1.0)
    assert p[0] < p[1]  # the more significant modality updates fewer units
    # M = 3: Σ p = M - 1, equal significance keeps 2/3 each
    p3 = update_ratios(torch.tensor([0.1, 0.2, 0.4]), 0.2)
    e = [math.exp(x / 0.2) for x in (0.1, 0.2, 0.4)]
    assert p3.tolist() == pytest.approx([1 - v / sum(e) for v in e], rel=1e-6)
    assert p3.sum().item() == pytest.approx(2.0)
    assert update_ratios(torch.full((3,), 0.3), 1.0).tolist() == pytest.approx([2 / 3] * 3)
    # clamp (release): [0.1, 0.9]
    assert update_ratios(torch.tensor([2.0, 0.0]), 0.1, clamp=True).tolist() == pytest.approx([0.1, 0.9])

    # the method applies exactly these formulas step by step (driven with a fixed ξ sequence)
    import tunebal.methods.amss as amss_mod

    original = amss_mod.modal_significance
    seq = iter(xis)
    amss_mod.modal_significance = lambda *a, **k: (next(seq), torch.zeros(2), torch.ones(2))
    try:
        inputs, labels = next(engine.iterate(tiny_data.train, shuffle=True))
        for _ in xis:
            engine.train_step(inputs, labels)
    finally:
        amss_mod.modal_significance = original
    assert torch.allclose(method.u, u) and torch.allclose(method.p, update_ratios(u, 0.5))
    assert method.metrics()["p_audio"] == pytest.approx((update_ratios(xis[0], 0.5)[0] + p[0]).item() / 2, rel=1e-5)


def test_needs_two_modalities():
    from tunebal.methods.amss import AMSS

    with pytest.raises(ConfigError, match="at least 2"):
        AMSS.check_compatible(1, "concat")


# --------------------------------------------------------------------------- sampling


def test_sampler_selects_exactly_what_torch_multinomial_selects():
    w = importance_weights(torch.rand(40) ** 3)
    for n in (1, 7, 20, 39, 40):
        g1, g2 = torch.Generator().manual_seed(n), torch.Generator().manual_seed(n)
        selected, pi = sample_units(w, n, g1)
        ref = torch.multinomial(w, n, replacement=False, generator=g2)
        assert int(selected.sum()) == n
        assert set(selected.nonzero().flatten().tolist()) == set(ref.tolist())
        assert torch.equal(g1.get_state(), g2.get_state())  # same draws consumed
        assert bool(((pi > 0) & (pi <= 1))[selected].all())
    assert torch.equal(sample_units(w, 40, g1)[1], torch.ones(40))  # keep all: π = 1


def test_selection_frequency_follows_importance():
    """Empirical inclusion frequencies match the exact inclusion probabilities of successive
    sampling (enumerated), within 5 binomial standard errors, and rank like the importance."""
    fisher = torch.tensor([0.5, 1.0, 1.5, 2.0, 2.0, 3.0])
    w = importance_weights(fisher)
    n, draws = 3, 20000
    exact = torch.tensor(exact_inclusion_probabilities(w.double().tolist(), n))
    assert exact.sum().item() == pytest.approx(n)
    gen = torch.Generator().manual_seed(0)
    selected, _ = sample_units(w.expand(draws, 6).contiguous(), n, gen)  # draws independent rows
    assert bool((selected.sum(1) == n).all())
    counts = selected.sum(0).float()
    freq = counts / draws
    se = torch.sqrt(exact * (1 - exact) / draws)
    assert bool(((freq - exact).abs() <= 5 * se).all()), (freq, exact)
    assert freq[0] < freq[1] < freq[2] < freq[5] and freq[3] < freq[5] and freq[4] < freq[5]
    # inclusion is not proportional to importance (π_j != n·w_j, and != w_j) -- the reason
    # AMSS+ needs inclusion probabilities, not the one-draw probabilities w_j
    nw = n * w.double()
    assert exact[5] < nw[5] - 0.05 and exact[0] > nw[0] + 0.01


def _keys_and_loo_pi(w, n, gen):
    """The draws of sample_units (same generator use) and π_j(τ_{-j}) for *every* unit j."""
    keys = w / torch.empty_like(w).exponential_(1.0, generator=gen)
    sk, order = torch.sort(keys, dim=-1, descending=True)
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(w.shape[-1]).expand_as(order))
    selected = rank < n
    kappa = torch.where(selected, sk[:, n : n + 1], sk[:, n - 1 : n])  # n-th largest key of the *other* units
    return selected, -torch.expm1(-w / kappa)


def test_amss_plus_weights_are_unbiased_and_a_shrinks_as_derived():
    """E[1{j∈S}/(π_j + a)] = 1 for a = 0 (HT with rank-conditioned π), = E[π_j/(π_j+a)] for
    a > 0; the paper's literal 1/p_j (one-draw probability) is biased by ~n."""
    fisher = torch.tensor([0.3, 0.5, 0.8, 1.0, 1.2, 1.5, 2.0, 3.0])
    w = importance_weights(fisher)
    n, draws = 3, 40000
    rows = w.expand(draws, 8).contiguous()
    for a in (0.0, 0.2):
        g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
        selected, pi = sample_units(rows, n, g1)
        sel2, pi_all = _keys_and_loo_pi(rows, n, g2)
        assert torch.equal(selected, sel2) and torch.allclose(pi[selected], pi_all[selected])
        s = torch.where(selected, 1.0 / (pi + a), torch.zeros_like(pi)).double()  # AMSS+ weight
        r = (pi_all / (pi_all + a)).double()  # its conditional expectation given the other keys
        mean_s, mean_r = s.mean(0), r.mean(0)
        z = (mean_s - mean_r) / ((s.var(0) + r.var(0)) / draws).sqrt()
        assert bool((z.abs() < 5).all()), z
        if a == 0.0:
            assert torch.equal(mean_r, torch.ones(8, dtype=torch.float64))
            assert bool(((mean_s - 1).abs() < 5 * s.std(0) / math.sqrt(draws)).all())
        else:
            assert bool((mean_r < 0.95).all())  # a visibly shrinks: the test would see a missing a
            assert bool((mean_s < 1 - 5 * s.std(0) / math.sqrt(draws)).all())
    naive = (selected.double() / w.double()).mean(0)
    assert bool((naive > 1.5).all())  # the literal 1/p_j: far from unbiased with n = 3 draws


def test_units_to_keep_is_ceil():
    assert units_to_keep(torch.tensor(0.5), 60).item() == 30
    assert units_to_keep(torch.tensor(0.3), 10).item() == 3  # float32 0.3·10 = 3.0000001
    assert units_to_keep(torch.tensor(0.31), 10).item() == 4
    assert units_to_keep(torch.tensor(0.0), 10).item() == 0
    assert units_to_keep(torch.tensor(1.0), 10).item() == 10


# --------------------------------------------------------------------------- masking in the engine


def _backward_only(engine, u):
    """One training step up to after_backward (no optimiser step); returns grads before/after."""
    method, model = engine.method, engine.model
    model.train()
    method.u = u.clone()
    inputs, labels = next(engine.iterate(engine.data.train, shuffle=True))
    ctx = StepContext(model=model, inputs=inputs, labels=labels, epoch=0, step=0)
    ctx.encoded = model.encode(inputs)
    ctx.features = method.before_fusion(ctx)
    ctx.logits = model.head(ctx.features)
    ctx.loss = method.loss(ctx)
    engine.optimizer.zero_grad(set_to_none=True)
    ctx.loss.backward()
    before = {name: p.grad.clone() for name, p in model.named_parameters()}
    method.after_backward(ctx)
    return ctx, before


def _unit_norms(layer, grads_by_param):
    total = grads_by_param[layer.weight].abs().reshape(layer.units, -1).sum(1) if not layer.element else grads_by_param[layer.weight].abs().reshape(-1)
    if not layer.element:
        for p in ([layer.bias] if layer.bias is not None else []) + layer.tied:
            total = total + grads_by_param[p].abs()
    return total


@pytest.mark.parametrize(
    "method, extra",
    [
        ("amss", {}),
        ("amss_plus", {}),
        ("amss", {"scope": "layer"}),
        ("amss_plus", {"mask_unit": "element"}),
        ("amss", {"fisher": "per_sample", "fisher_source": "unimodal", "mask_norm": False}),
    ],
)
def test_after_backward_keeps_exactly_ceil_pN_units(tiny_data, method, extra):
    engine = Engine(tiny_data, method, {**CFG, "ms_momentum": 0.999, **extra})
    ctx, before = _backward_only(engine, torch.tensor([0.31, 0.12]))
    m = engine.method
    p = m.p
    assert 0.05 < p[0] < p[1] < 0.95  # audio made dominant: it keeps fewer units
    names = {param: name for name, param in engine.model.named_parameters()}
    grads_after = {param: param.grad for param in engine.model.parameters()}
    grads_before = {param: before[names[param]] for param in engine.model.parameters()}
    for k, mod in enumerate(m.modalities):
        layers = m.layers[mod]
        kept_per_layer = []
        for layer in layers:
            assert bool((_unit_norms(layer, grads_before) > 0).all())  # no naturally-zero unit
            after = _unit_norms(layer, grads_after)
            kept_per_layer.append(int((after > 0).sum()))
            # dropped units are exactly zero in every tied tensor, kept ones are g (AMSS) or g·s, s > 0
            w_after, w_before = layer.weight.grad, grads_before[layer.weight]
            keep = (after > 0)
            view = layer.unit_view(keep)
            assert bool((w_after[~view.expand_as(w_after)] == 0).all())
            if method == "amss":
                assert torch.equal(w_after[view.expand_as(w_after)], w_before[view.expand_as(w_after)])
        float_p = float(p[k])
        if extra.get("scope") == "layer":
            assert kept_per_layer == [math.ceil(float_p * layer.units) for layer in layers]
        else:
            assert sum(kept_per_layer) == math.ceil(float_p * sum(layer.units for layer in layers))
    # the classifier part of each modality (concat: its columns of the classifier) is drawn on its own:
    # exactly ⌈p·d⌉ columns (or ⌈p·C·d⌉ elements) keep their gradient, the others are zero
    w_after, w_before = engine.model.classifier.weight.grad, before["classifier.weight"]
    start = 0
    for k, mod in enumerate(m.modalities):
        d = engine.model.encoders[mod].out_dim
        block_after, block_before = w_after[:, start : start + d], w_before[:, start : start + d]
        assert bool((block_before != 0).all())
        if extra.get("mask_unit") == "element":
            kept = block_after != 0
            assert int(kept.sum()) == math.ceil(float(p[k]) * block_after.numel() - 1e-6)
        else:
            kept = (block_after != 0).any(0)
            assert bool(((block_after != 0) == kept[None]).all())  # whole columns
            assert int(kept.sum()) == math.ceil(float(p[k]) * d - 1e-6)
        if method == "amss":
            assert torch.equal(block_after[block_after != 0], block_before[block_after != 0])
        start += d
    # the shared classifier bias and the fusion are untouched
    for name, param in engine.model.named_parameters():
        if not name.startswith("encoders.") and name != "classifier.weight":
            assert torch.equal(param.grad, before[name]), name
    # every conv/linear weight of the small encoders is masked; with mask_norm also every BN
    cov = m.coverage()
    if extra.get("mask_unit") == "element" or extra.get("mask_norm") is False:
        assert all(0.9 < c < 1.0 for c in cov.values())
    else:
        assert cov == {"audio": 1.0, "visual": 1.0}


def test_amss_plus_masked_gradient_is_unbiased_in_the_method(tiny_data):
    """Mean over many draws of the masked, rescaled encoder gradient ≈ the full gradient (a = 0)."""
    engine = Engine(tiny_data, "amss_plus", {**CFG, "width": 2, "ms_momentum": 0.999, "plus_a": 0.0})
    ctx, before = _backward_only(engine, torch.tensor([0.25, 0.1]))
    m = engine.method
    params = [p for mod in m.modalities for layer in m.layers[mod] for p in layer.parameters()]
    names = {param: name for name, param in engine.model.named_parameters()}
    full = [before[names[p]] for p in params]
    full_of = {id(p): g for p, g in zip(params, full)}
    draws = 2000
    unit_scales = {mod: [] for mod in m.modalities}
    proj = []
    norm2 = sum(float((g * g).sum()) for g in full)
    for _ in range(draws):
        for p, g in zip(params, full):
            p.grad = g.clone()
        m.after_backward(ctx)
        proj.append(sum(float((p.grad * g).sum()) for p, g in zip(params, full)) / norm2)
        for mod in m.modalities:  # each channel unit is scaled uniformly: read its factor
            unit_scales[mod].append(torch.cat([(layer.weight.grad.reshape(layer.units, -1)[:, 0]
                                                / full_of[id(layer.weight)].reshape(layer.units, -1)[:, 0])
                                               for layer in m.layers[mod]]))
    proj = torch.tensor(proj, dtype=torch.float64)
    assert abs(proj.mean().item() - 1.0) < 5 * proj.std().item() / math.sqrt(draws)
    tested = 0
    for mod in m.modalities:
        s = torch.stack(unit_scales[mod]).double()  # (draws, units)
        hits = (s > 0).sum(0)
        ok = (hits >= 100) & (s.std(0) > 0)  # units drawn often enough for a normal z-test
        tested += int(ok.sum())
        z = (s.mean(0) - 1.0) / (s.std(0) / math.sqrt(draws))
        assert bool((z[ok].abs() < 5).all()), z[ok]
    assert tested >= 20
    # negative control: the same draws without the 1/π weights (plain AMSS) shrink the gradient
    unit_sq = torch.cat([
        sum(full_of[id(q)].reshape(layer.units, -1).square().sum(1) for q in layer.parameters())
        for mod in m.modalities for layer in m.layers[mod]
    ]).double()
    kept = torch.cat([(torch.stack(unit_scales[mod]) > 0) for mod in m.modalities], dim=1).double()
    plain = kept @ unit_sq / norm2
    assert plain.mean().item() < 1.0 - 10 * plain.std().item() / math.sqrt(draws)


def _per_sample_fisher(net, layers, x, y) -> tuple[list, object]:
    """AMSS+'s per-sample Fisher of every mask layer from one backward pass over (x, y), and
    the indices of the layers with per-sample support."""
    hooks = PerSampleFisher(layers)
    hooks.capture = True
    F.cross_entropy(net(x), y).backward()
    got = [hooks.fisher(i, layer, x.shape[0]) for i, layer in enumerate(layers)]
    hooks.remove()
    return got, hooks.supported


def test_per_sample_fisher_is_the_exact_empirical_fisher():
    """Hook-based per-sample Fisher equals brute-force per-sample gradients (no BN coupling),
    with frames of one clip summed into one sample."""
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=True)
            self.lin = nn.Linear(4, 5)
            self.out = nn.Linear(5, 3, bias=False)

        def forward(self, x):
            b, t = x.shape[:2]
            h = F.relu(self.conv(x.reshape(b * t, *x.shape[2:]))).mean((2, 3))
            return self.out(torch.tanh(self.lin(h.reshape(b, t, -1).mean(1))))

    net, b = Net(), 6
    x, y = torch.randn(b, 2, 3, 8, 8), torch.randint(0, 3, (b,))
    for unit in ("channel", "element"):
        layers = find_mask_layers(net, unit)
        got, supported = _per_sample_fisher(net, layers, x, y)
        for layer, fisher in zip(layers, got):
            params = [layer.weight] + ([layer.bias] if layer.bias is not None else [])
            sq = [torch.zeros_like(p) for p in params]
            for i in range(b):
                for s, g in zip(sq, torch.autograd.grad(F.cross_entropy(net(x[i : i + 1]), y[i : i + 1]), params)):
                    s += g * g / b
            ref = sq[0].reshape(-1) if unit == "element" else sq[0].flatten(1).sum(1) + (sq[1] if len(sq) > 1 else 0)
            torch.testing.assert_close(fisher, ref, rtol=1e-4, atol=1e-10)
        net.zero_grad()


# --------------------------------------------------------------------------- training and resume


@pytest.mark.parametrize("fusion", ["concat", "sum", "film", "gated"])
@pytest.mark.parametrize("method", ["amss", "amss_plus"])
def test_trains_one_epoch_with_every_fusion(tiny_data, method, fusion):
    metrics = Engine(tiny_data, method, {**CFG, "fusion": fusion}).run_epoch()
    assert math.isfinite(metrics["train/loss"])
    for m in ("audio", "visual"):
        assert 0.0 <= metrics[f"method/p_{m}"] <= 1.0
        for key in ("xi", "u", "mi", "hx"):
            assert math.isfinite(metrics[f"method/{key}_{m}"])


@pytest.fixture(scope="module")
def tri_data(_isolated_cache):
    return build_dataset("synth", {"n_train": 128, "n_val": 64, "n_test": 64, "modalities": 3})


@pytest.mark.parametrize("method", ["amss", "amss_plus"])
def test_trains_with_three_modalities(tri_data, method):
    engine = Engine(tri_data, method, {**CFG, "fusion": "gated"})
    metrics = engine.run_epoch()
    ps = [metrics[f"method/p_{m}"] for m in ("audio", "visual", "text")]
    assert math.isfinite(metrics["train/loss"]) and all(0 <= p <= 1 for p in ps)
    assert float(engine.method.p.sum()) == pytest.approx(2.0, abs=1e-5)  # Eq. 4 for M = 3
    assert [layer.units for layer in engine.method.layers["text"]] == [16, 16, 32, 32]  # linear rows


@pytest.mark.parametrize(
    "method, extra",
    [("amss_plus", {}), ("amss", {"fisher": "per_sample", "scope": "layer"})],
)
def test_resume_from_checkpoint_is_bit_exact(tiny_data, tmp_path, method, extra):
    cfg = {**CFG, **extra}
    straight = Engine(tiny_data, method, cfg)
    history = [_strip_times(straight.run_epoch()) for _ in range(2)]

    first = Engine(tiny_data, method, cfg)
    m1 = first.run_epoch()
    path = str(tmp_path / "ckpt.arrow")
    first.save(path, m1)
    u_saved = first.method.u.clone()

    resumed = Engine(tiny_data, method, cfg)
    resumed.load(path)
    assert torch.equal(resumed.method.u, u_saved)
    assert torch.equal(resumed.method.rng.get_state(), first.method.rng.get_state())
    assert _strip_times(resumed.run_epoch()) == history[1]
    for (k, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k

    # the momentum state matters: resuming without it gives a different run
    lost = Engine(tiny_data, method, cfg)
    lost.load(path)
    lost.method.u = None
    assert _strip_times(lost.run_epoch()) != history[1]


# --------------------------------------------------------------------------- search spaces


@pytest.mark.parametrize("method", ["amss", "amss_plus"])
def test_search_spaces_load(method):
    from ray.tune.search.sample import Float

    from tunebal.tune.spaces import load_space

    space = load_space(method, "synth", 8)
    assert isinstance(space["tau"], Float) and space["tau"].lower == pytest.approx(0.1) and space["tau"].upper == pytest.approx(4.0)
    assert "lr" in space and "ms_momentum" in space
    if method == "amss_plus":
        assert "plus_a" in space


# --------------------------------------------------------------------------- attention heads (Transformer)

SEQ_CFG = {"width": 4, "batch_size": 16, "lr": 0.1, "optimizer": "sgd", "momentum": 0.0, "weight_decay": 0.0}


def _seq_data(n=48, shapes=None, classes=3, seed=0):
    """In-memory sequence data (the MOSI encoder's input kind) whose label is visible in every modality."""
    shapes = shapes or {"a": (5, 6), "b": (7, 4)}
    gen = torch.Generator().manual_seed(seed)

    def split(count):
        y = torch.randint(0, classes, (count,), generator=gen)
        inputs = {m: torch.randn(count, *s, generator=gen) for m, s in shapes.items()}
        for x in inputs.values():
            x[:, 0, 0] += 2.0 * y
        return Split(inputs, y)

    return MultimodalData(name="seq", modalities=tuple(shapes), kinds={m: "sequence" for m in shapes},
                          num_classes=classes, class_names=[str(c) for c in range(classes)],
                          train=split(n), val=split(16), test=split(16))


def _head_rows(h, d_model, head_dim):
    """in_proj rows of head h, written out independently: its q, k and v slices of the packed weight."""
    return [s * d_model + h * head_dim + j for s in range(3) for j in range(head_dim)]


def _head_cols(h, head_dim):
    return list(range(h * head_dim, (h + 1) * head_dim))


def test_head_slices_are_the_heads_pytorch_computes():
    """Zeroing head h's out_proj columns cuts exactly the in_proj rows (q, k, v) and biases of head h
    off the loss: the slices the test (and the mask) call head h are PyTorch's head h."""
    torch.manual_seed(0)
    enc = transformer_encoder((5, 6), d_model=16, layers=1, heads=4)
    mha = enc.blocks[0][1].self_attn
    x = torch.randn(3, 5, 6)
    for h in range(4):
        with torch.no_grad():
            saved = mha.out_proj.weight.clone()
            mha.out_proj.weight[:, _head_cols(h, 4)] = 0.0
        enc.zero_grad()
        enc(x).square().sum().backward()
        rows = _head_rows(h, 16, 4)
        others = [r for r in range(48) if r not in rows]
        assert bool((mha.in_proj_weight.grad[rows] == 0).all()) and bool((mha.in_proj_bias.grad[rows] == 0).all())
        assert bool((mha.in_proj_weight.grad[others].abs().sum(1) > 0).all())
        with torch.no_grad():
            mha.out_proj.weight.copy_(saved)


def test_transformer_mask_layers_have_head_units():
    enc = transformer_encoder((5, 6), d_model=16, layers=2, heads=4)
    layers = find_mask_layers(enc, "channel")
    kinds = [(layer.name.split(".")[-1], layer.kind, layer.units) for layer in layers]
    assert kinds == [("proj", "channel", 16), ("self_attn", "head", 4), ("linear1", "channel", 32), ("linear2", "channel", 16),
                     ("self_attn", "head", 4), ("linear1", "channel", 32), ("linear2", "channel", 16)]
    assert all(not layer.tied for layer in layers)  # the layers' LayerNorms act on the residual stream
    names = [layer.name for layer in layers]
    assert not any("out_proj" in n for n in names)  # out_proj's columns belong to the heads


def test_head_fisher_is_the_sum_over_the_heads_slices():
    torch.manual_seed(1)
    enc = transformer_encoder((5, 6), d_model=16, layers=1, heads=4)
    F.cross_entropy(nn.Linear(16, 3)(enc(torch.randn(6, 5, 6))), torch.tensor([0, 1, 2, 0, 1, 2])).backward()
    layer = next(layer for layer in find_mask_layers(enc, "channel") if layer.kind == "head")
    mha = layer.module
    want = torch.stack([
        mha.in_proj_weight.grad[_head_rows(h, 16, 4)].square().sum() + mha.in_proj_bias.grad[_head_rows(h, 16, 4)].square().sum()
        + mha.out_proj.weight.grad[:, _head_cols(h, 4)].square().sum()
        for h in range(4)
    ])
    torch.testing.assert_close(layer_fisher_from_grad(layer), want)


@pytest.mark.parametrize("method", ["amss", "amss_plus"])
def test_masked_heads_receive_no_update(method):
    data = _seq_data()
    # scope=layer: ⌈p·H⌉ heads of every attention layer are kept (pooled, a head's Fisher -- summed over
    # 3·d_h·D + 3·d_h + D·d_h elements -- dwarfs a row's, and the heads are nearly always drawn)
    engine = Engine(data, method, {**SEQ_CFG, "mask_parts": "backbone", "ms_momentum": 0.999, "scope": "layer"})
    _, before = _backward_only(engine, torch.tensor([0.3, 0.1]))
    m, model = engine.method, engine.model
    params_before = {name: p.detach().clone() for name, p in model.named_parameters()}
    names = {p: name for name, p in model.named_parameters()}
    masked_heads = kept_heads = 0
    for k, mod in enumerate(m.modalities):
        for layer in m.layers[mod]:
            if layer.kind != "head":
                continue
            kept_units = 0
            mha = layer.module
            d, hd = mha.embed_dim, mha.head_dim
            for h in range(mha.num_heads):
                rows, cols = _head_rows(h, d, hd), _head_cols(h, hd)
                parts_after = [mha.in_proj_weight.grad[rows], mha.in_proj_bias.grad[rows], mha.out_proj.weight.grad[:, cols]]
                parts_before = [before[names[mha.in_proj_weight]][rows], before[names[mha.in_proj_bias]][rows],
                                before[names[mha.out_proj.weight]][:, cols]]
                assert all(bool((b != 0).any()) for b in parts_before)
                if all(bool((a == 0).all()) for a in parts_after):
                    masked_heads += 1
                else:  # kept: every part keeps its gradient (AMSS) or a positive multiple of it (AMSS+)
                    kept_heads += 1
                    kept_units += 1
                    for a, b in zip(parts_after, parts_before):
                        if method == "amss":
                            assert torch.equal(a, b)
                        else:
                            ratio = a[b != 0] / b[b != 0]
                            assert bool((ratio > 0).all()) and float(ratio.max() - ratio.min()) < 1e-4 * float(ratio.max())
            assert torch.equal(mha.out_proj.bias.grad, before[names[mha.out_proj.bias]])  # no head's
            assert kept_units == math.ceil(float(m.p[k]) * mha.num_heads - 1e-6)
    assert masked_heads > 0 and kept_heads > 0
    # the optimiser step: a masked head's q/k/v rows, biases and out_proj columns do not move, a kept head's do
    engine.optimizer.step()
    for mod in m.modalities:
        for layer in (layer for layer in m.layers[mod] if layer.kind == "head"):
            mha = layer.module
            for h in range(mha.num_heads):
                rows, cols = _head_rows(h, mha.embed_dim, mha.head_dim), _head_cols(h, mha.head_dim)
                w, b, o = names[mha.in_proj_weight], names[mha.in_proj_bias], names[mha.out_proj.weight]
                same = [torch.equal(mha.in_proj_weight[rows], params_before[w][rows]),
                        torch.equal(mha.in_proj_bias[rows], params_before[b][rows]),
                        torch.equal(mha.out_proj.weight[:, cols], params_before[o][:, cols])]
                masked = bool((mha.in_proj_weight.grad[rows] == 0).all())
                assert same == [masked] * 3, (layer.name, h)


def test_per_sample_fisher_for_sequence_inputs_matches_per_sample_gradients():
    """(B, L, D) activations: the hook Fisher of every linear layer of a Transformer encoder equals
    (1/B) Σ_i (∂ℓ_i/∂w)^2 from one backward per sample (dropout off: samples are independent)."""
    torch.manual_seed(2)
    enc = transformer_encoder((7, 6), d_model=16, layers=2, heads=4)
    for module in enc.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if isinstance(module, nn.MultiheadAttention):
            module.dropout = 0.0
    head = nn.Linear(16, 3)
    net = nn.Sequential(enc, head)
    b = 5  # L = 7 is no multiple of B: positions are summed within a sample, never folded into rows
    x, y = torch.randn(b, 7, 6), torch.randint(0, 3, (b,))
    for unit in ("channel", "element"):
        layers = find_mask_layers(enc, unit)
        got, supported = _per_sample_fisher(net, layers, x, y)
        linear = [i for i, layer in enumerate(layers) if isinstance(layer.module, nn.Linear)]
        assert len(linear) == (5 if unit == "channel" else 7)
        for i, layer in enumerate(layers):
            if i not in linear or "out_proj" in layer.name:  # attention runs in F.multi_head_attention_forward
                assert got[i] is None and (i not in supported or "out_proj" in layer.name)
                continue
            params = [layer.weight] + ([layer.bias] if layer.bias is not None else [])
            sq = [torch.zeros_like(p) for p in params]
            for s in range(b):
                for acc, g in zip(sq, torch.autograd.grad(F.cross_entropy(net(x[s : s + 1]), y[s : s + 1]), params)):
                    acc += g * g / b
            ref = sq[0].reshape(-1) if unit == "element" else sq[0].sum(1) + (sq[1] if len(sq) > 1 else 0)
            torch.testing.assert_close(got[i], ref, rtol=1e-4, atol=1e-10)
        net.zero_grad()


def test_amss_trains_a_transformer_with_per_sample_fisher():
    data = _seq_data()
    engine = Engine(data, "amss_plus", {**SEQ_CFG, "fisher": "per_sample"})
    metrics = engine.run_epoch()
    assert math.isfinite(metrics["train/loss"]) and 0.0 < metrics["method/p_a"] < 1.0
    assert engine.method.coverage()["a"] > 0.9  # proj, heads (in_proj + out_proj weight), linear1/2


# --------------------------------------------------------------------------- classifier masking (mask_parts)


def _classifier_step(data, method, parts, fusion="concat"):
    engine = Engine(data, method, {**CFG, "fusion": fusion, "optimizer": "sgd", "momentum": 0.0, "weight_decay": 0.0,
                                   "mask_parts": parts, "ms_momentum": 0.0})
    before = {name: p.detach().clone() for name, p in engine.model.named_parameters()}
    inputs, labels = next(engine.iterate(data.train, shuffle=True))
    engine.model.train()
    engine.train_step(inputs, labels)
    moved = {name: (p.detach() != before[name]) for name, p in engine.model.named_parameters()}
    return engine, moved


@pytest.mark.parametrize("method", ["amss", "amss_plus"])
def test_classifier_mask_freezes_the_masked_columns(tiny_data, method):
    engine, moved = _classifier_step(tiny_data, method, "classifier")
    p, start = engine.method.p, 0
    for k, mod in enumerate(engine.method.modalities):
        d = engine.model.encoders[mod].out_dim
        block = moved["classifier.weight"][:, start : start + d]
        cols = block.all(0)
        assert bool((block.any(0) == cols).all())  # a column moves as a whole or not at all
        assert int(cols.sum()) == math.ceil(float(p[k]) * d - 1e-6) < d
        start += d
    assert bool(moved["classifier.bias"].all())  # shared by the modalities: never masked
    for name, changed in moved.items():  # mask_parts=classifier leaves every encoder unit free
        if name.startswith("encoders.") and name.endswith("weight") and changed.dim() > 1:
            assert bool(changed.reshape(changed.shape[0], -1).any(1).all()), name

    engine, moved = _classifier_step(tiny_data, method, "backbone")
    assert bool(moved["classifier.weight"].all())  # backbone only: the classifier is free
    m = engine.method
    for k, mod in enumerate(m.modalities):  # ... and ⌈p·N⌉ encoder units moved
        rows = [moved[f"encoders.{mod}.{layer.name.split('/', 1)[1]}.weight"] for layer in m.layers[mod]]
        kept = sum(int(r.reshape(r.shape[0], -1).any(1).sum()) for r in rows)
        assert kept == math.ceil(float(m.p[k]) * sum(layer.units for layer in m.layers[mod]) - 1e-6)


def test_classifier_part_of_sum_fusion_is_the_modality_projection(tiny_data):
    engine, moved = _classifier_step(tiny_data, "amss", "classifier", fusion="sum")
    p = engine.method.p
    for k, mod in enumerate(engine.method.modalities):
        cols = moved[f"fusion.proj.{k}.weight"].any(0)
        d = engine.model.encoders[mod].out_dim
        assert int(cols.sum()) == math.ceil(float(p[k]) * d - 1e-6) < d
    assert bool(moved["classifier.weight"].all())


def test_classifier_per_sample_fisher_is_the_per_sample_outer_product(tiny_data):
    """The classifier's per-sample gradient is (softmax − onehot)_i ⊗ a_i of the fused call only
    (the zero-out calls of the same module receive no gradient from the fused loss)."""
    engine = Engine(tiny_data, "amss", {**CFG, "fisher": "per_sample", "mask_parts": "classifier"})
    m, model = engine.method, engine.model
    model.train()
    inputs, labels = next(engine.iterate(tiny_data.train, shuffle=True))
    ctx = StepContext(model=model, inputs=inputs, labels=labels, epoch=0, step=0)
    ctx.encoded = model.encode(inputs)
    ctx.features = m.before_fusion(ctx)
    ctx.logits = model.head(ctx.features)
    ctx.loss = m.loss(ctx)  # computes the zero-out logits too (more calls of the classifier)
    ctx.loss.backward()
    b = labels.shape[0]
    a = torch.cat([ctx.features[mod] for mod in m.modalities], 1).detach()
    delta = torch.softmax(ctx.logits.detach(), 1) - F.one_hot(labels, tiny_data.num_classes).float()
    fisher_cols = (delta[:, :, None] * a[:, None, :]).square().mean(0).sum(0)  # (1/B) Σ_i Σ_c (∂ℓ_i/∂W_cj)^2
    start = 0
    for _, layers, indices in m._groups:
        (layer,), (idx,) = layers, indices
        stop = start + layer.units
        assert layer.columns == (start, stop) and idx in m.per_sample.supported
        torch.testing.assert_close(m._fisher(idx, layer, b), fisher_cols[start:stop], rtol=1e-4, atol=1e-12)
        start = stop
    assert start == a.shape[1]
