"""QAT by distillation from the fp model: the KL term against a hand-written KL, the mixed loss of a training step,
the teacher kept out of checkpoints and the optimizer, and the QAT callback's teacher loading and its errors."""

from __future__ import annotations

import pytest
import torch

import qmamba
from callbacks import QAT
from qmamba.data import IGNORE_INDEX
from qmamba.lightning import LMModule
from qmamba.lightning.module import distillation_loss
from qmamba.models import MambaLM
from qmamba.models.loading import save_pretrained
from qmamba.qnn import calibrate, prepare, set_mode


def test_distillation_loss_is_token_mean_kl_without_padding():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 7, generator=g), torch.randn(2, 5, 7, generator=g)
    y = torch.randint(0, 7, (2, 5), generator=g)
    y[1, 3:] = IGNORE_INDEX
    pt, ls, lt = t.softmax(-1), s.log_softmax(-1), t.log_softmax(-1)
    per_token = (pt * (lt - ls)).sum(-1)  # KL(teacher || student) at each position
    expected = per_token[y != IGNORE_INDEX].mean()
    torch.testing.assert_close(distillation_loss(s, t, y), expected, rtol=1e-6, atol=1e-7)
    assert distillation_loss(t, t, y).abs() < 1e-6
    assert distillation_loss(s, t, y) > 0



def _module(tmp_path):
    torch.manual_seed(0)
    fp = MambaLM(qmamba.preset("tiny"))
    folder = save_pretrained(fp, tmp_path / "fp")
    module = LMModule(model=None, init_from=str(folder), sample_tokens=0)
    prepare(module.model, "qat_w8a8")
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    calibrate(module.model, [ids], progress=False)
    set_mode(module.model, "fakequant")
    return module, folder, ids


@pytest.mark.parametrize("weight", [1.0, 0.5])
def test_training_step_mixes_cross_entropy_and_kl(tmp_path, weight, monkeypatch):
    module, folder, ids = _module(tmp_path)
    teacher = qmamba.models.loading.load_model(folder)
    module.set_teacher(teacher, weight)
    monkeypatch.setattr(module, "log", lambda *a, **k: None)
    x, y = ids[:, :-1], ids[:, 1:]
    loss = module.training_step((x, y, torch.ones(2)), 0)
    with torch.no_grad():
        logits, target = module.model(x), teacher(x)
    ce = module._loss(logits, y)
    expected = (1 - weight) * ce + weight * distillation_loss(logits, target, y)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())  # the teacher is frozen
    assert not any(k.startswith("_teacher") or "teacher" in k for k in module.state_dict())


def test_qat_callback_loads_the_teacher_from_init_from(tmp_path):
    module, folder, ids = _module(tmp_path)
    QAT(distill=1.0).setup(None, module, "fit")
    teacher, weight = module._teacher
    assert weight == 1.0 and not any(p.requires_grad for p in teacher.parameters())
    with torch.no_grad():  # the teacher is the fp model QAT started from
        torch.testing.assert_close(teacher(ids), qmamba.models.loading.load_model(folder)(ids), rtol=0, atol=0)
    QAT(distill=0.0).setup(None, module, "fit")  # no distillation: nothing loaded, nothing changed
    assert module._teacher[0] is teacher


def test_qat_callback_errors(tmp_path):
    with pytest.raises(ValueError, match="distill must be in"):
        QAT(distill=1.5)
    module = LMModule(model="tiny", sample_tokens=0)
    with pytest.raises(ValueError, match="needs a teacher"):
        QAT(distill=1.0).setup(None, module, "fit")
    other = save_pretrained(MambaLM(qmamba.preset("tiny", n_layer=3)), tmp_path / "other")
    with pytest.raises(ValueError, match="different model"):
        QAT(distill=1.0, teacher=str(other)).setup(None, module, "fit")
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        module.set_teacher(MambaLM(qmamba.preset("tiny")), 0.0)
