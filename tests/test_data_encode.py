"""Encoding through the registry: golden label masks and loss-scale vectors on the real Llama 3 tokenizer,
ChatML (SmolLM2) masks, tool-call weights (llama3.1), the pad-token choice per format."""

from __future__ import annotations

import pytest

from edgezh import templates
from edgezh.data import agent
from edgezh.data.conversation import Conversation, RecordError
from edgezh.data.encode import IGNORE, Encoder, choose_pad, load_tokenizer

EOT, EOM, BOS = 128009, 128008, 128000

CHAT = [
    {"role": "system", "content": "你是助手。"},
    {"role": "user", "content": "你好"},
    {"role": "assistant", "content": "你好！"},
    {"role": "user", "content": "1+1等于几？"},
    {"role": "assistant", "content": "等于2。"},
]
# <|begin_of_text|> <|start_header_id|>system<|end_header_id|>\n\n 你 是 助 手 。 <|eot_id|> …
GOLDEN_IDS = [128000, 128006, 9125, 128007, 271, 57668, 21043, 103129, 46034, 1811, 128009,
              128006, 882, 128007, 271, 57668, 53901, 128009,
              128006, 78191, 128007, 271, 57668, 53901, 6447, 128009,
              128006, 882, 128007, 271, 16, 10, 16, 50667, 35304, 104194, 11571, 128009,
              128006, 78191, 128007, 271, 50667, 35304, 17, 1811, 128009]
_ = IGNORE
GOLDEN_LABELS = [_, _, _, _, _, _, _, _, _, _, _,
                 _, _, _, _, _, _, _,
                 _, _, _, _, 57668, 53901, 6447, 128009,          # 你 好 ！ <|eot_id|>
                 _, _, _, _, _, _, _, _, _, _, _, _,
                 _, _, _, _, 50667, 35304, 17, 1811, 128009]      # 等 于 2 。 <|eot_id|>

REACT = [
    {"role": "user", "content": "北京天气怎么样？"},
    {"role": "assistant", "content": "Thought: 查天气\nAction: weather\nAction Input: {\"city\": \"北京\"}"},
    {"role": "user", "content": "Observation: 晴"},
    {"role": "assistant", "content": "Thought: 知道了\nFinal Answer: 北京今天晴。"},
]
# trained tokens of the two assistant turns, with their weights under {action: 2, action_input: 2}
REACT_TRAINED = [
    (85269, 1.0), (25, 1.0), (70453, 1.0), (36827, 1.0), (102146, 1.0), (198, 1.0),   # Thought: 查天气\n
    (2573, 2.0), (25, 2.0), (9282, 2.0), (198, 1.0),                                   # Action: weather\n
    (2573, 2.0), (5688, 2.0), (25, 2.0), (5324, 2.0), (9103, 2.0), (794, 2.0), (330, 2.0), (70090, 2.0), (9388, 2.0),
    (EOT, 1.0),                                                                        # Action Input: {"city": "北京"}
    (85269, 1.0), (25, 1.0), (119041, 1.0), (45893, 1.0), (35287, 1.0), (198, 1.0),   # Thought: 知道了\n
    (19918, 1.0), (22559, 1.0), (25, 1.0), (110536, 1.0), (110916, 1.0), (116366, 1.0), (1811, 1.0), (EOT, 1.0),
]


@pytest.fixture(scope="module")
def llama3(tiny_llama3):
    return Encoder(tiny_llama3, "llama3", {})


def test_golden_labels_train_assistant_content_and_eot_only(llama3) -> None:
    encoded = llama3.encode(Conversation(CHAT))
    assert encoded.input_ids == GOLDEN_IDS
    assert encoded.labels == GOLDEN_LABELS
    assert encoded.loss_scale == [0.0 if label == IGNORE else 1.0 for label in GOLDEN_LABELS]
    assert encoded.input_ids.count(BOS) == 1 and encoded.input_ids[0] == BOS
    assert encoded.trained == 9
    # the stop token of every assistant turn is trained; those of system/user turns are not
    eot_positions = [i for i, t in enumerate(GOLDEN_IDS) if t == EOT]
    assert [GOLDEN_LABELS[i] == EOT for i in eot_positions] == [False, False, True, False, True]


def test_golden_loss_scale_for_react(tiny_llama3) -> None:
    encoder = Encoder(tiny_llama3, "llama3", {"action": 2.0, "action_input": 2.0})
    conversation = Conversation(REACT, spans=agent.react_spans(REACT))
    encoded = encoder.encode(conversation)
    trained = [(t, s) for t, label, s in zip(encoded.input_ids, encoded.labels, encoded.loss_scale) if label != IGNORE]
    assert trained == REACT_TRAINED
    assert all(s == 0.0 for label, s in zip(encoded.labels, encoded.loss_scale) if label == IGNORE)
    # the observation is a user turn: not trained, so not weighted
    assert 38863 in encoded.input_ids and encoded.labels[encoded.input_ids.index(38863)] == IGNORE


def test_without_loss_scale_agent_spans_weigh_one(llama3) -> None:
    encoded = llama3.encode(Conversation(REACT, spans=agent.react_spans(REACT)))
    assert {s for label, s in zip(encoded.labels, encoded.loss_scale) if label != IGNORE} == {1.0}


def test_tool_call_json_weighted_and_eom_trained_with_llama31(tiny_llama3) -> None:
    encoder = Encoder(tiny_llama3, "llama3.1", {"tool_call": 3.0})
    tools = [{"type": "function", "function": {"name": "weather", "description": "天气",
                                               "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
    messages = [{"role": "user", "content": "北京天气？"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"type": "function", "function": {"name": "weather", "arguments": {"city": "北京"}}}]},
                {"role": "tool", "content": "{\"sky\":\"晴\"}"},
                {"role": "assistant", "content": "晴天。"}]
    encoded = encoder.encode(Conversation(messages, tools))
    tok = encoder.tokenizer
    trained = [(t, s) for t, label, s in zip(encoded.input_ids, encoded.labels, encoded.loss_scale) if label != IGNORE]
    eom = trained.index((EOM, 1.0))
    call_text = tok.decode([t for t, _ in trained[:eom]])
    assert call_text == '{"name": "weather", "parameters": {"city":"北京"}}'
    assert {s for _, s in trained[:eom]} == {3.0}
    assert tok.decode([t for t, _ in trained[eom + 1:]]) == "晴天。<|eot_id|>" and {s for _, s in trained[eom + 1:]} == {1.0}
    # the tool result (ipython turn) is context, not trained
    assert '"sky"' not in tok.decode([t for t, _ in trained])


def test_chatml_masks_content_and_im_end_not_the_newline(smollm2) -> None:
    encoder = Encoder(smollm2, "chatml", {})
    encoded = encoder.encode(Conversation(CHAT[:3]))
    tok = encoder.tokenizer
    assert tok.decode(encoded.input_ids) == templates.render("chatml", CHAT[:3])
    trained = [t for t, label in zip(encoded.input_ids, encoded.labels) if label != IGNORE]
    assert tok.decode(trained) == "你好！<|im_end|>"
    # the "\n" after <|im_end|> is outside the generation block; ChatML has no BOS
    assert tok.decode(encoded.input_ids[-1:]) == "\n" and encoded.labels[-1] == IGNORE
    assert tok.decode(encoded.input_ids[:1]) == "<|im_start|>"


def test_pad_token_per_format(tiny_llama3, smollm2) -> None:
    llama = choose_pad(load_tokenizer(tiny_llama3), templates.get("llama3"))
    assert (llama.token, llama.token_id) == ("<|finetune_right_pad_id|>", 128004)
    for name in ("llama3", "llama3.1"):
        assert choose_pad(load_tokenizer(tiny_llama3), templates.get(name)).token not in templates.get(name).stop_tokens
    # SmolLM2 pads with <|im_end|>, the ChatML stop token: a special token the template never prints is used instead
    tok = load_tokenizer(smollm2)
    assert tok.pad_token == "<|im_end|>"
    chatml = choose_pad(tok, templates.get("chatml"))
    assert (chatml.token, chatml.token_id) == ("<repo_name>", 3)
    assert chatml.token not in templates.get("chatml").stop_tokens


def test_pad_choice_fails_clearly_when_nothing_fits(smollm2) -> None:
    from edgezh.errors import UserError

    class Bare:
        pad_token, bos_token, unk_token = "<|im_end|>", None, None
        added_tokens_decoder = {}

        def get_vocab(self):
            return {"<|im_end|>": 2}

    with pytest.raises(UserError, match="no pad token distinct from the stop tokens"):
        choose_pad(Bare(), templates.get("chatml"))


def test_template_refusal_is_a_record_error(tiny_llama3) -> None:
    encoder = Encoder(tiny_llama3, "llama3", {})
    with pytest.raises(RecordError) as info:
        encoder.encode(Conversation([{"role": "user", "content": "x"}, {"role": "assistant", "content": "",
                                     "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": {}}}]}]))
    assert info.value.reason == "template_error" and "llama3.1" in info.value.detail
