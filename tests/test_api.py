"""The Python API's own duties: models are run in eval mode, whatever mode they come in."""

import copy

import torch
from torch import nn

from lowbit import api
from lowbit.calibration import image_calibration
from lowbit.models.modules import evaluating


def _net() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                      nn.Dropout(0.5), nn.Conv2d(16, 3, 3, padding=1))  # fmt: skip
    m[1].running_mean.uniform_(-0.2, 0.2)  # "trained" statistics
    m[1].running_var.uniform_(0.5, 2.0)
    return m  # in training mode, as every module is built


def test_a_model_in_training_mode_is_quantized_as_in_eval_mode():
    """Calibration forwards in training mode updated the user's BatchNorm statistics (the
    fold then skipped it) and took ranges from batch statistics and dropout: the result was
    off by 0.46 of the output's scale. The modes are restored after."""
    calib = image_calibration(torch.rand(8, 3, 12, 12, generator=torch.Generator().manual_seed(1)),
                              "noise")  # fmt: skip
    trained, built = _net(), _net().eval()
    stats = trained[1].running_mean.clone()
    api.quantize(trained, "conv-w8a8-static", calib, progress=False)
    api.quantize(built, "conv-w8a8-static", calib, progress=False)
    assert torch.equal(stats, _net()[1].running_mean) and trained.training and not built.training
    x = torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        assert torch.equal(trained.eval()(x), built(x))


def test_evaluating_restores_each_modules_mode():
    model = _net()
    model[3].eval()  # a mix: one module already in eval mode
    with evaluating(model, None):
        assert not any(m.training for m in model.modules())
    assert model.training and model[1].training and not model[3].training
    ref = copy.deepcopy(model)
    with evaluating(ref):
        pass
    assert [m.training for m in ref.modules()] == [m.training for m in model.modules()]
