import torch

from helpers import tiny_family_model
from lowbit.calibration import block_output, capture_block_inputs
from lowbit.models.families import find_blocks


def test_replaying_blocks_from_captured_inputs_reproduces_the_model():
    model = tiny_family_model("llama")
    windows = torch.randint(0, 64, (5, 16))
    _, blocks = find_blocks(model)
    calls = capture_block_inputs(model, blocks[0], windows, batch_size=2)
    assert [c.hidden.shape[0] for c in calls] == [2, 2, 1]
    with torch.no_grad():
        outs = []
        for call in calls:
            h = call.hidden
            for block in blocks:
                h = block_output(block, call.with_hidden(h))
            outs.append(model.lm_head(model.model.norm(h)))
        assert torch.allclose(torch.cat(outs), model(windows).logits, atol=1e-5)
