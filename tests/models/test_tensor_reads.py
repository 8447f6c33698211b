import torch
import transformers as tf
from torch import nn

from helpers import make_recipe, tiny_family_model
from lowbit import api
from lowbit.models import quantizable_layers
from lowbit.models.tensor_reads import TensorReads
from lowbit.nn import QuantLinear


class _Mixer(nn.Module):
    def __init__(self, exact: bool):
        super().__init__()
        self.exact = exact
        self.read = nn.Linear(4, 4)
        self.guarded = nn.Linear(4, 4)
        self.called = nn.Linear(4, 4)

    def fuse(self):  # not run by forward
        return self.called.weight.sum()

    def _product(self, x):  # run by forward
        return self.read.weight @ x.T

    def forward(self, x):
        y = self._product(x) + self.called(x).T
        if self.exact and x.shape[0] > 1:  # (unknown) and ... -> reachable only when exact
            y = y + self.guarded.weight.sum()
        return y if self.exact else y + self.guarded(x).T


def test_reads_reached_on_this_instance_count():
    reads = TensorReads()
    plain, exact = _Mixer(exact=False), _Mixer(exact=True)
    assert reads.reads(plain, "read") and not reads.reads(plain, "called")
    assert not reads.reads(plain, "guarded") and reads.reads(exact, "guarded")


def test_mamba_keeps_the_layer_its_mixer_reads_as_a_tensor_float():
    """Its mixer computes ``dt_proj.weight @ x`` (its fused training path reads the others,
    but not on an evaluated model); the model casts to ``lm_head.weight.dtype``."""
    config = tf.MambaConfig(vocab_size=64, hidden_size=64, num_hidden_layers=2, state_size=8)
    model = tf.MambaForCausalLM(config).eval()
    names = {n.rpartition(".")[2] for n, _ in quantizable_layers(model)}
    assert names == {"in_proj", "x_proj", "out_proj"}
    api.quantize(model, make_recipe({"bits": 4, "group_size": -1}), progress=False)
    assert type(model.backbone.layers[0].mixer.dt_proj) is nn.Linear
    assert isinstance(model.backbone.layers[0].mixer.x_proj, QuantLinear)
    with torch.no_grad():
        assert model(torch.arange(8)[None]).logits.isfinite().all()


def test_bloom_exact_tensor_parallel_branch_is_not_reached():
    model = tiny_family_model("bloom")  # pretraining_tp 1: the branch reading dense.weight is off
    assert len(quantizable_layers(model)) == 9


def test_a_test_on_a_property_that_raises_is_unknown_not_an_error():
    class Fast(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)

        @property
        def fused(self):
            raise RuntimeError("no kernels here")

        def forward(self, x):
            if self.fused:
                return x @ self.proj.weight
            return self.proj(x)

    assert TensorReads().reads(Fast(), "proj")  # (reachable for all we know)
    assert quantizable_layers(nn.Sequential(Fast())) == []
