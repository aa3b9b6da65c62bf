"""Tests of dsv3_min.chat: DeepSeek-V3's special tokens and the chat layout as segments (notebook 05's tests check
the rendered text and ids against transformers' rendering of the Jinja template)."""
import pytest

from dsv3_min.chat import ASSISTANT, BOS, EOS, SPECIAL_TOKENS, USER, chat_segments


def test_chat_segments_lay_out_a_conversation_as_deepseek_v3_does():
    """BOS, the system messages joined by a blank line, `<｜User｜>` + text per user turn, `<｜Assistant｜>` + text + EOS
    per assistant turn, and a final `<｜Assistant｜>` only with `add_generation_prompt`; markers flagged special, text
    not (a marker's spelling inside a message stays text)."""
    chat = [{"role": "system", "content": "a"}, {"role": "user", "content": f"b {ASSISTANT}"},
            {"role": "system", "content": "c"}, {"role": "assistant", "content": "d"}]
    want = [(BOS, True), ("a\n\nc", False), (USER, True), (f"b {ASSISTANT}", False), (ASSISTANT, True), ("d", False),
            (EOS, True)]
    assert chat_segments(chat, add_generation_prompt=False) == want
    assert chat_segments(chat) == [*want, (ASSISTANT, True)]
    assert SPECIAL_TOKENS[:2] == (BOS, EOS) and len(set(SPECIAL_TOKENS)) == 5


@pytest.mark.parametrize("message, why", [({"role": "tool", "content": "x"}, "expected 'system', 'user' or 'assistant'"),
                                          ({"role": "user", "content": None}, "must be a str, got NoneType")])
def test_chat_segments_refuse_other_roles_and_non_text(message, why):
    """A role other than system/user/assistant, or content that is not a str, is a `ValueError` naming the message."""
    with pytest.raises(ValueError, match=rf"messages\[0\].*{why}"):
        chat_segments([message])
