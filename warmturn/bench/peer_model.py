"""Give the peer servers the same prompt as warmturn's server, for a fair comparison.

SmolLM2's chat template (ChatML) ignores `tools`, so mlx_lm.server and vllm-mlx, which render
with the model's own template, would silently drop the ~1,300 tokens of tool schemas (and
the tool calls and results in the history) that warmturn's server renders into the system
turn (`server/render.py`: hermes-style `<tools>` / `<tool_call>` / `<tool_response>` text).
The peers would then prefill far fewer tokens per request and the comparison would measure
the template, not the cache.

When the model's template has no tool support, the peers get a copy of the model directory
(weights symlinked) whose chat template renders tools, tool calls and tool results with
the same wording as warmturn's renderer. Models whose template already handles tools are
used as they are.
"""

from __future__ import annotations

import json
from pathlib import Path

# ChatML with tools rendered into the system turn, worded like server/render.py's
# hermes_tools_text / hermes_call_text / tool_result_text (key order aside).
TOOLS_CHATML = (
    "{%- set ns = namespace(sys='', rest=messages) -%}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set ns.sys = messages[0]['content'] -%}{%- set ns.rest = messages[1:] -%}"
    "{%- endif -%}"
    "{%- if tools -%}"
    "{%- set head = '# Tools\\n\\nYou can call the functions described below. Their JSON signatures are listed "
    "inside <tools></tools>:\\n<tools>\\n' -%}"
    "{%- set tail = '</tools>\\n\\nTo call a function, write a JSON object with its name and arguments between "
    "<tool_call> and </tool_call> tags, one call per tag:\\n<tool_call>\\n"
    "{\"name\": \"FUNCTION_NAME\", \"arguments\": {\"ARGUMENT\": \"VALUE\"}}\\n</tool_call>' -%}"
    "{%- set ns2 = namespace(t=head) -%}"
    "{%- for t in tools -%}{%- set ns2.t = ns2.t ~ (t | tojson) ~ '\\n' -%}{%- endfor -%}"
    "{%- set ns.sys = (ns.sys ~ '\\n\\n' ~ ns2.t ~ tail) if ns.sys else (ns2.t ~ tail) -%}"
    "{%- endif -%}"
    "{%- if ns.sys -%}{{ '<|im_start|>system\\n' ~ ns.sys ~ '<|im_end|>\\n' }}"
    "{%- else -%}{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\\n' }}{%- endif -%}"
    "{%- for m in ns.rest -%}"
    "{%- set raw = m['content'] if m['content'] is defined and m['content'] is not none else '' -%}"
    "{%- set c = raw if raw is string else (raw | map(attribute='text') | join('\\n')) -%}"
    "{%- if m['role'] == 'tool' -%}"
    "{%- if loop.first or ns.rest[loop.index0 - 1]['role'] != 'tool' -%}{{ '<|im_start|>user\\n' }}"
    "{%- else -%}{{ '\\n' }}{%- endif -%}"
    "{{ '<tool_response>\\n' ~ c ~ '\\n</tool_response>' }}"
    "{%- if loop.last or ns.rest[loop.index0 + 1]['role'] != 'tool' -%}{{ '<|im_end|>\\n' }}{%- endif -%}"
    "{%- elif m['role'] == 'assistant' and m['tool_calls'] is defined and m['tool_calls'] -%}"
    "{{ '<|im_start|>assistant\\n' ~ (c ~ '\\n' if c else '') }}"
    "{%- for call in m['tool_calls'] -%}"
    "{%- set a = call['function']['arguments'] -%}"
    "{{ '<tool_call>\\n{\"name\": \"' ~ call['function']['name'] ~ '\", \"arguments\": ' ~ "
    "(a if a is string else a | tojson) ~ '}\\n</tool_call>' ~ ('' if loop.last else '\\n') }}"
    "{%- endfor -%}{{ '<|im_end|>\\n' }}"
    "{%- else -%}{{ '<|im_start|>' ~ m['role'] ~ '\\n' ~ c ~ '<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


def template_handles_tools(model_dir: Path) -> bool:
    """True when the model's own chat template mentions `tools` (it renders them itself)."""
    jinja = model_dir / "chat_template.jinja"
    if jinja.exists():
        return "tools" in jinja.read_text(errors="replace")
    try:
        cfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return True  # unknown: leave the model alone
    template = cfg.get("chat_template")
    if isinstance(template, list):  # named templates
        template = " ".join(t.get("template", "") for t in template if isinstance(t, dict))
    return not isinstance(template, str) or "tools" in template


def peer_model_dir(model_dir: Path, work_dir: Path) -> Path:
    """The model directory the peers should load: the model itself when its template handles
    tools, else a copy in `work_dir` (weights symlinked) with the tools-aware template."""
    if template_handles_tools(model_dir):
        return model_dir
    out = work_dir / f"peer-{model_dir.name}"
    out.mkdir(parents=True, exist_ok=True)
    for f in model_dir.iterdir():
        target = out / f.name
        if f.name in ("tokenizer_config.json", "chat_template.jinja") or target.exists():
            continue
        target.symlink_to(f.resolve())
    cfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    cfg["chat_template"] = TOOLS_CHATML
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=1))
    (out / "chat_template.jinja").write_text(TOOLS_CHATML)
    return out
