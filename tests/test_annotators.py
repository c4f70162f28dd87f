"""EMA annotators: trainable parameters only, float32, the warm-up rule, a no-grad forward, save/load."""

import pytest
import torch

from trl_adaptive.annotators import EMAAnnotators


def small_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    model[1].requires_grad_(False)  # frozen: must not get a shadow copy
    return model


def test_shadows_cover_trainable_parameters_only_in_float32():
    model = small_model().to(torch.bfloat16)
    model[0].float()
    annotators = EMAAnnotators(model, [0.9, 0.5])
    assert annotators.names == ["0.weight", "0.bias"]
    assert len(annotators) == 2
    for shadow in annotators.shadows:
        assert all(t.dtype == torch.float32 for t in shadow.values())


def test_update_follows_warmed_up_decay():
    model = small_model()
    annotators = EMAAnnotators(model, [0.9999, 0.5])
    w0 = model[0].weight.detach().clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
    annotators.update(model)
    # update n = 0 uses min(decay, (1 + 0) / (10 + 0)) = 0.1 for both decays: 0.1 * old + 0.9 * new
    for shadow in annotators.shadows:
        torch.testing.assert_close(shadow["0.weight"], 0.1 * w0 + 0.9 * (w0 + 1.0))
    with torch.no_grad():
        model[0].weight.add_(1.0)
    annotators.update(model)
    # update n = 1: min(0.9999, 2/11) = 2/11 and min(0.5, 2/11) = 2/11 again; n = 5 would separate them
    prev = 0.1 * w0 + 0.9 * (w0 + 1.0)
    for shadow in annotators.shadows:
        torch.testing.assert_close(shadow["0.weight"], (2 / 11) * prev + (9 / 11) * (w0 + 2.0))
    annotators.num_updates = 100
    assert annotators.effective_decay(0.9999) == pytest.approx(101 / 110)
    assert annotators.effective_decay(0.5) == 0.5


def test_annotator_forward_uses_shadow_weights_without_grad():
    model = small_model()
    annotators = EMAAnnotators(model, [0.5])
    with torch.no_grad():
        annotators.shadows[0]["0.weight"].mul_(2.0)
    x = torch.randn(4, 3)
    expected = model[1](torch.nn.functional.linear(x, 2.0 * model[0].weight, model[0].bias))
    out = annotators(0, model, x)
    torch.testing.assert_close(out, expected)
    assert not out.requires_grad
    # the model's own weights are untouched
    torch.testing.assert_close(model(x), model[1](model[0](x)))


def test_save_and_load_round_trip(tmp_path):
    model = small_model()
    annotators = EMAAnnotators(model, [0.9, 0.5])
    with torch.no_grad():
        model[0].weight.add_(0.5)
    annotators.update(model)
    annotators.save(str(tmp_path))

    restored = EMAAnnotators(small_model(), [0.9, 0.5])
    restored.load(str(tmp_path))
    assert restored.num_updates == 1
    for a, b in zip(annotators.shadows, restored.shadows):
        for name in a:
            torch.testing.assert_close(a[name], b[name])

    with pytest.raises(ValueError, match="annotator_decays"):
        EMAAnnotators(small_model(), [0.9]).load(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="annotators.safetensors"):
        EMAAnnotators(small_model(), [0.9]).load(str(tmp_path / "missing"))
