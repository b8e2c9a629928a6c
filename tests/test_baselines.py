"""The simple baselines (one modality alone, the unimodal ensemble) and the overridable step/prediction hooks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tunebal.engine import Engine
from tunebal.errors import ConfigError
from tunebal.methods.base import Method
from tunebal.methods.ensemble import average_probabilities
from tunebal.methods.registry import METHODS, register_method

CONFIG = {"batch_size": 32, "lr": 0.05, "weight_decay": 0.0, "width": 4}


def test_unimodal_trains_only_its_encoder_and_scores_its_zero_out_prediction(data2):
    engine = Engine(data2, "unimodal", {**CONFIG, "modality": "visual"})
    audio_before = {k: v.clone() for k, v in engine.model.encoders["audio"].state_dict().items()}
    visual_before = {k: v.clone() for k, v in engine.model.encoders["visual"].state_dict().items()}
    metrics = engine.run_epoch()
    audio_after, visual_after = engine.model.encoders["audio"].state_dict(), engine.model.encoders["visual"].state_dict()
    weights = [k for k in audio_before if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert all(torch.equal(audio_before[k], audio_after[k]) for k in weights)  # no gradient reached audio
    assert any(not torch.equal(visual_before[k], visual_after[k]) for k in weights)
    assert metrics["val/acc"] == metrics["val/acc_visual"]  # the scored prediction is visual's zero-out one


def test_unimodal_needs_a_valid_modality(data2):
    with pytest.raises(ConfigError, match="pass --set modality=NAME"):
        Engine(data2, "unimodal", {**CONFIG})
    with pytest.raises(ConfigError, match="got 'text'"):
        Engine(data2, "unimodal", {**CONFIG, "modality": "text"})


def test_ensemble_gradient_is_each_modalitys_own_ce_and_prediction_averages_probabilities(data2):
    engine = Engine(data2, "ensemble", CONFIG)
    model = engine.model
    inputs, labels = next(engine.iterate(data2.train, shuffle=True))
    # independent computation: CE of each modality's zero-out logits, summed; nothing fused
    model.train()
    feats = model.encode(inputs).features
    total = 0.0
    for m in ("audio", "visual"):
        masked = {j: (z if j == m else torch.zeros_like(z)) for j, z in feats.items()}
        total = total + F.cross_entropy(model.head(masked), labels)
    want = torch.autograd.grad(total, list(model.encoders["audio"].parameters()))
    torch.manual_seed(0)
    ctx_grads = {}

    def capture(ctx):
        ctx_grads.update({id(p): p.grad.clone() for p in model.encoders["audio"].parameters()})

    engine.method.after_backward = capture
    engine.train_step(inputs, labels)
    for p, g in zip(model.encoders["audio"].parameters(), want):
        torch.testing.assert_close(ctx_grads[id(p)], g, rtol=1e-4, atol=1e-6)
    uni = {"a": torch.tensor([[2.0, 0.0]]), "b": torch.tensor([[0.0, 1.0]])}
    probs = (torch.softmax(uni["a"], 1) + torch.softmax(uni["b"], 1)) / 2
    torch.testing.assert_close(average_probabilities(uni).exp(), probs)
    model.eval()
    with torch.no_grad():
        feats = model.encode(inputs).features
        torch.testing.assert_close(engine.method.eval_logits(model, feats), average_probabilities(model.unimodal_logits(feats)))


def test_a_method_may_override_the_training_step():
    class TwoUpdates(Method):
        name = "_two_updates_test"

        def train_step(self, engine, inputs, labels):
            engine.joint_step(inputs, labels)
            return engine.joint_step(inputs, labels)

    register_method(TwoUpdates)
    try:
        from tunebal.data import build_dataset

        data = build_dataset("synth", {"n_train": 64, "n_val": 16, "n_test": 16, "image_size": 16})
        engine = Engine(data, "_two_updates_test", {"batch_size": 32, "width": 4})
        engine.train_epoch()
        assert engine.global_step == 4  # 2 batches x 2 updates
    finally:
        METHODS.pop("_two_updates_test", None)
