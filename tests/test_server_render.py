"""render.py with the real default tokenizer (no model weights needed): byte-stable prompts."""

from __future__ import annotations

import json
from itertools import pairwise

import pytest

from tests.conftest import FIXTURES
from warmturn.server.render import Renderer
from warmturn.server.wire import RequestError, parse_messages_request

CC = FIXTURES / "claude_code"

# A template that, like Gemma's, refuses system turns except the first (raise_exception).
STRICT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' and not loop.first %}{{ raise_exception('system only first') }}{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# A template with native tool support (tools list and tool_calls rendered by the template).
TOOLS_TEMPLATE = (
    "{% if tools %}<|im_start|>tools\n{% for t in tools %}{{ t['function']['name'] }};{% endfor %}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
    "{% for c in m.get('tool_calls', []) %}"
    "[call {{ c['function']['name'] }} {{ c['function']['arguments'] | tojson }}]{% endfor %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from mlx_lm.tokenizer_utils import load

    return load(model_dir)


@pytest.fixture(scope="module")
def renderer(tokenizer):
    return Renderer(tokenizer)


def hf_with_template(model_dir, template):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    tok.chat_template = template
    return tok


def req(messages, **kw):
    body = {"model": "m", "max_tokens": 8, "messages": messages}
    body.update(kw)
    return parse_messages_request(body)


TOOLS = [{"name": "Read", "description": "Read a file",
          "input_schema": {"type": "object", "properties": {"file_path": {"type": "string"}}, "required": ["file_path"]}},
         {"name": "Grep", "description": "Search",
          "input_schema": {"type": "object", "properties": {"pattern": {"type": "string"}}}}]


def conversation(input_order=("file_path", "limit"), result_order=(0, 1), text_shape="string", thinking=False):
    inputs = [{"file_path": "/a", "limit": 3}, {"pattern": "x"}]
    inputs[0] = {k: inputs[0][k] for k in input_order}
    assistant = ([{"type": "thinking", "thinking": "hmm", "signature": "sig"}] if thinking else []) + [
        {"type": "text", "text": "Looking."},
        {"type": "tool_use", "id": "toolu_1", "name": "Read", "input": inputs[0]},
        {"type": "tool_use", "id": "toolu_2", "name": "Grep", "input": inputs[1]},
    ]
    results = [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "line"},
               {"type": "tool_result", "tool_use_id": "toolu_2", "content": [{"type": "text", "text": "found"}],
                "is_error": False}]
    first = "Read /a" if text_shape == "string" else [{"type": "text", "text": "Read /a", "cache_control": {"type": "ephemeral"}}]
    return req(
        [{"role": "user", "content": first},
         {"role": "assistant", "content": assistant},
         {"role": "user", "content": [results[i] for i in result_order]}],
        system=[{"type": "text", "text": "You are terse."}], tools=TOOLS,
    )


def test_history_renders_identically_whatever_shape_the_client_echoes(renderer):
    reference = renderer.render(conversation())
    variants = [
        conversation(input_order=("limit", "file_path")),  # tool_use input keys reordered
        conversation(result_order=(1, 0)),  # parallel tool results in the other order
        conversation(text_shape="blocks"),  # string vs one-block array with cache_control
        conversation(thinking=True),  # thinking blocks come back on assistant turns
    ]
    for v in variants:
        assert renderer.render(v).tokens == reference.tokens
    assert renderer.render(conversation()).text == reference.text  # deterministic
    # the results follow the tool_use order: Read's before Grep's
    assert reference.text.index("line") < reference.text.index("found")


def test_tools_and_system_come_first_and_form_the_prefix(renderer, tokenizer):
    r = renderer.render(conversation())
    assert r.prefix_len > 0
    head = tokenizer.decode(r.tokens[: r.prefix_len])
    assert head.startswith("<|im_start|>system\nYou are terse.")
    assert "<tools>" in head and '"name": "Read"' in head and "Read /a" not in head
    other = renderer.render(req([{"role": "user", "content": "something else"}],
                                system=[{"type": "text", "text": "You are terse."}], tools=TOOLS))
    assert other.tokens[: other.prefix_len] == r.tokens[: r.prefix_len]


def test_prefix_order_tools_first(tokenizer):
    sys_first = Renderer(tokenizer, "system-first").render(conversation())
    tools_first = Renderer(tokenizer, "tools-first").render(conversation())
    assert sys_first.text.index("You are terse.") < sys_first.text.index("<tools>")
    assert tools_first.text.index("<tools>") < tools_first.text.index("You are terse.")
    assert tools_first.prefix_len == sys_first.prefix_len > 0
    with pytest.raises(ValueError):
        Renderer(tokenizer, "messages-first")


def test_mid_conversation_system_is_rendered_in_place(renderer):
    msgs = [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "R"}]},
            {"role": "system", "content": "<total_tokens>99 tokens left</total_tokens>"},
            {"role": "assistant", "content": "A2"}, {"role": "user", "content": "Q2"}]
    r = renderer.render(req(msgs, system="Top."))
    t = r.text
    assert t.startswith("<|im_start|>system\nTop.<|im_end|>")
    assert t.index("A1") < t.index("R") < t.index("<|im_start|>system\n<total_tokens>") < t.index("A2") < t.index("Q2")
    without = renderer.render(req([msgs[0]], system="Top."))
    assert r.tokens[: r.prefix_len] == without.tokens[: without.prefix_len]


def test_notes_after_a_plain_prompt_render_before_it(renderer):
    """Claude Code 2.1.332's environment note (role system, after the first prompt): the turn
    before the answer is the user's prompt, and every later request still extends the
    previous one's tokens (the recorded session of 8 requests)."""
    lines = [json.loads(x) for x in (FIXTURES / "claude_code_2.1.332" / "p_read.jsonl").read_text().splitlines()]
    bodies = [x["request"]["body"] for x in lines if isinstance(x["request"].get("body"), dict)]
    assert [m["role"] for m in bodies[0]["messages"]] == ["user", "system"]
    first = renderer.render(parse_messages_request(bodies[0]))
    note, prompt = first.text.index("# Environment"), first.text.rindex("What does notes.txt say?")
    assert note < prompt and first.text.rindex("<|im_start|>user") < prompt
    assert "# Environment" not in first.text[first.text.rindex("<|im_start|>user"):]
    rendered = [renderer.render(parse_messages_request(b)) for b in bodies]
    for a, b in pairwise(rendered):
        head = a.tokens[:-3]  # the generation prompt (assistant header) aside
        assert b.tokens[: len(head)] == head
    several = renderer.render(req([{"role": "user", "content": "Q1"}, {"role": "system", "content": "N1"},
                                   {"role": "system", "content": "N2"}]))
    assert several.text.index("N1") < several.text.index("N2") < several.text.index("Q1")


def test_template_refusing_inner_system_gets_it_folded_into_the_next_user_turn(model_dir):
    r = Renderer(hf_with_template(model_dir, STRICT_TEMPLATE))
    assert r.leading_system_ok and not r.inner_system_ok
    out = r.render(req([{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
                        {"role": "system", "content": "NOTE"}, {"role": "user", "content": "Q2"}], system="Top."))
    assert "<|im_start|>user\nNOTE\n\nQ2<|im_end|>" in out.text
    assert out.text.index("A1") < out.text.index("NOTE")
    after_prompt = r.render(req([{"role": "user", "content": "Q1"}, {"role": "system", "content": "NEXT"}],
                                system="Top."))
    assert "<|im_start|>user\nNEXT\n\nQ1<|im_end|>" in after_prompt.text
    trailing = r.render(req([{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
                             {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": "R"}]},
                             {"role": "system", "content": "LAST"}], system="Top."))
    assert "</tool_response>\n\nLAST<|im_end|>" in trailing.text


def test_template_with_tool_support_gets_tools_natively(model_dir):
    r = Renderer(hf_with_template(model_dir, TOOLS_TEMPLATE))
    assert r.template_tools
    out = r.render(conversation())
    assert out.text.startswith("<|im_start|>tools\nRead;Grep;<|im_end|>")
    assert "<tools>" not in out.text  # no hermes description in the system prompt
    assert '[call Read {"file_path": "/a", "limit": 3}]' in out.text
    assert "<|im_start|>tool\nline<|im_end|>\n<|im_start|>tool\nfound" in out.text
    swapped = r.render(conversation(input_order=("limit", "file_path"), result_order=(1, 0)))
    assert swapped.tokens == out.tokens


def test_string_and_block_system_render_the_same(renderer):
    a = renderer.render(req([{"role": "user", "content": "x"}], system="S"))
    b = renderer.render(req([{"role": "user", "content": "x"}], system=[{"type": "text", "text": "S"}]))
    assert a.tokens == b.tokens


def test_assistant_prefill_continues_the_last_turn(renderer):
    r = renderer.render(req([{"role": "user", "content": "Name a color"}, {"role": "assistant", "content": "The color is "}]))
    assert r.text.endswith("<|im_start|>assistant\nThe color is")


def test_per_request_instructions_come_last_and_keep_the_prefix(renderer):
    schema = {"type": "object", "properties": {"title": {"type": "string"}}}
    plain = renderer.render(req([{"role": "user", "content": "hi"}], system="S", tools=TOOLS))
    shaped = renderer.render(req([{"role": "user", "content": "hi"}], system="S", tools=TOOLS,
                                 output_config={"format": {"type": "json_schema", "schema": schema}},
                                 tool_choice={"type": "any"}))
    assert shaped.tokens[: plain.prefix_len] == plain.tokens[: plain.prefix_len]
    assert shaped.text.index("hi") < shaped.text.index("JSON schema") < shaped.text.rindex("<|im_start|>assistant")
    assert "Answer by calling one of the tools." in shaped.text


@pytest.mark.parametrize("name", ["small_two_turns", "tool_round"])
def test_real_claude_code_turns_extend_the_previous_prompt(renderer, name):
    """Each recorded turn's whole prompt is a prefix of the next turn's: reusable KV."""
    bodies = [json.loads(line)["body"] for line in (CC / f"{name}.jsonl").read_text().splitlines()]
    outs = [renderer.render(parse_messages_request(b)) for b in bodies if b]
    assert len(outs) >= 2
    for a, b in pairwise(outs):
        assert a.prefix_len > 0 and a.prefix_len == b.prefix_len
        assert b.tokens[: len(a.tokens)] == a.tokens


def test_full_claude_code_request_is_longer_than_the_context(renderer):
    body = json.loads((CC / "full_first_turn.json").read_text())["body"]
    r = renderer.render(parse_messages_request(body))
    assert len(r.tokens) > 8192  # the server must refuse it before prefill (tested over HTTP)


def test_template_error_is_a_request_error(model_dir):
    tok = hf_with_template(model_dir, "{{ raise_exception('no') }}")
    with pytest.raises(RequestError, match="chat template rejected"):
        Renderer(tok).render(req([{"role": "user", "content": "x"}]))
