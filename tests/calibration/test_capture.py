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


def test_equal_keyword_tensors_are_shared_between_batches():
    model = tiny_family_model("llama")
    _, blocks = find_blocks(model)
    calls = capture_block_inputs(model, blocks[0], torch.randint(0, 64, (6, 16)), batch_size=2)
    rotary = [c.kwargs["position_embeddings"] for c in calls]
    assert rotary[0] is rotary[1] is rotary[2]  # equal positions: held once, not per batch
    assert not torch.equal(calls[0].hidden, calls[1].hidden)
