"""`lowbit generate` and `lowbit chat` end to end on a tiny random model with a real tokenizer."""

import io
import json

import pytest
import torch
from transformers import AutoTokenizer

from lowbit.cli import main


def run(capsys, *argv):
    code = main(["-q", *argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def chat_folder(tiny_folder):
    tok = AutoTokenizer.from_pretrained(tiny_folder)
    tok.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}the"
    tok.save_pretrained(tiny_folder)
    return tiny_folder


def test_generate_streams_what_greedy_generate_gives(tiny_folder, tiny_model, tokenizer, capsys):
    prompt = "the quick brown fox"
    code, out, _ = run(capsys, "generate", str(tiny_folder), "--prompt", prompt,
                       "--max-new-tokens", "12", "--json")  # fmt: skip
    assert code == 0
    got = json.loads(out)
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    with torch.inference_mode():
        ref = tiny_model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert got["tokens"] == ref[0, ids.shape[1] :].tolist() and got["finish"] == "length"
    assert {"text", "prefill_tps", "decode_tps", "prompt_tokens", "loop"} <= set(got)
    code, streamed, _ = run(capsys, "generate", str(tiny_folder), "--prompt", prompt,
                            "--max-new-tokens", "12")  # fmt: skip
    assert code == 0 and streamed.split() == got["text"].split() and streamed.endswith("\n")


def test_generate_chat_template_sampling_and_stdin(chat_folder, capsys, monkeypatch):
    args = ["generate", str(chat_folder), "--chat", "--max-new-tokens", "6", "--json"]
    code, out, _ = run(capsys, *args, "--prompt", "a stitch in time")
    assert code == 0 and len(json.loads(out)["tokens"]) == 6
    monkeypatch.setattr("sys.stdin", io.StringIO("a stitch in time"))
    code, piped, _ = run(capsys, *args, "--prompt", "-")
    assert code == 0 and json.loads(piped)["tokens"] == json.loads(out)["tokens"]
    hot = [*args, "--prompt", "the dog", "--temperature", "1.2", "--top-p", "0.9"]
    first = json.loads(run(capsys, *hot, "--seed", "1")[1])["tokens"]
    assert first == json.loads(run(capsys, *hot, "--seed", "1")[1])["tokens"]


@pytest.mark.parametrize("extra,match", [
    (["--prompt", "   "], "prompt is empty"),
    (["--prompt", "the " * 300], "context of 256"),
    (["--prompt", "the dog", "--chat"], "no chat template"),
    (["--prompt", "the dog", "--top-p", "2"], "top_p"),
])  # fmt: skip
def test_generate_bad_input_is_one_line(tiny_folder, capsys, extra, match):
    code, out, err = run(capsys, "generate", str(tiny_folder), *extra)
    assert code == 2 and match in err and len(err.strip().splitlines()) == 1


def test_generate_zero_new_tokens_is_refused(tiny_folder, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["generate", str(tiny_folder), "--prompt", "the", "--max-new-tokens", "0"])
    assert exc.value.code == 2


def test_chat_keeps_the_conversation_and_resets(chat_folder, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("the dog\n\n/reset\nthe fox\n/exit\nnot read\n"))
    code, out, _ = run(capsys, "chat", str(chat_folder), "--max-new-tokens", "4")
    assert code == 0 and len(out.strip().splitlines()) == 2  # two replies, the rest ignored
