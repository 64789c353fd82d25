"""Agent-era conversations: tool calls and their results, a tools schema, reasoning and content parts, normalized by
01 from the shapes exports hold and trained by 05 exactly where transformers' {% generation %} mask says."""

import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import ROOT, load_stage, run_stage, train, write_overlay
from transformers import AutoTokenizer

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
TOOL_CHAT = {  # normalized: what 01 writes and 05 reads
    "messages": [
        {"role": "system", "content": "Use tools."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "tool_calls": [dict(CALL, id="c1")]},
        {"role": "tool", "tool_call_id": "c1", "content": "18 C, sunny"},
        {"role": "assistant", "content": "It is 18 C and sunny."},
    ],
    "tools": [WEATHER],
}
REASONING_CHAT = {
    "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "reasoning_content": "I should ask the tool.", "tool_calls": [CALL]},
        {"role": "tool", "content": "18 C"},
        {"role": "assistant", "reasoning_content": "The tool said 18.", "content": "18 C."},
    ]
}
TWO_ROUNDS = {
    "messages": [
        {"role": "user", "content": "2 + 2?"},
        {"role": "assistant", "reasoning_content": "Two and two.", "content": "4"},
        {"role": "user", "content": "And 3 + 3?"},
        {"role": "assistant", "reasoning_content": "Three and three.", "content": "6"},
    ]
}

# What exports hold (OpenAI with JSON-string arguments and null content, the older function-call shape,
# LLaMA-Factory's ShareGPT variant, content parts, `thinking`) and what 01 normalizes each to.
SHAPES = [
    (
        "openai",
        {
            "messages": [
                {"role": "system", "content": "Use tools."},
                {"role": "user", "content": "Weather in Paris?"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "c1",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": "c1", "content": "18 C, sunny"},
                {"role": "assistant", "content": "It is 18 C and sunny."},
            ],
            "tools": json.dumps([WEATHER]),
        },
        TOOL_CHAT,
    ),
    (
        "function-role",
        {
            "messages": [
                {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "function_call": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
                {"role": "function", "name": "get_weather", "content": "18 C"},
                {"role": "assistant", "content": "18 C."},
            ],
            "tools": [WEATHER["function"]],
        },
        {
            "messages": [
                {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "tool_calls": [CALL]},
                {"role": "tool", "name": "get_weather", "content": "18 C"},
                {"role": "assistant", "content": "18 C."},
            ],
            "tools": [WEATHER],
        },
    ),
    (
        "llama-factory",
        {
            "conversations": [
                {"from": "human", "value": "Weather in Paris?"},
                {"from": "function_call", "value": '{"name": "get_weather", "arguments": {"city": "Paris"}}'},
                {"from": "observation", "value": "18 C"},
                {"from": "gpt", "value": "18 C."},
            ],
            "system": "Use tools.",
            "tools": json.dumps([WEATHER["function"]]),
        },
        {
            "messages": [
                {"role": "system", "content": "Use tools."},
                {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "tool_calls": [CALL]},
                {"role": "tool", "content": "18 C"},
                {"role": "assistant", "content": "18 C."},
            ],
            "tools": [WEATHER],
        },
    ),
    (
        "parts-and-thinking",
        {
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "2 + 2?"}, {"type": "text", "text": " Be brief."}],
                },
                {"role": "assistant", "thinking": "Two and two.", "content": [{"type": "text", "text": "4"}]},
            ]
        },
        {
            "messages": [
                {"role": "user", "content": "2 + 2? Be brief."},
                {"role": "assistant", "reasoning_content": "Two and two.", "content": "4"},
            ]
        },
    ),
]

USER = {"role": "user", "content": "Q"}
BAD = [
    (
        {"messages": [USER, {"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        "message 2: content part 1 is 'image_url', not text",
    ),
    (
        {"messages": [USER, {"role": "tool", "content": "x"}, {"role": "assistant", "content": "A"}]},
        "must follow a tool",
    ),
    ({"messages": [USER, {"role": "assistant", "tool_calls": {"name": "f"}}]}, "message 2: tool call 1 must be"),
    (
        {"messages": [USER, {"role": "assistant", "tool_calls": [{"name": "f", "arguments": "{city"}]}]},
        "message 2, tool call 1: 'arguments' is not valid JSON",
    ),
    ({"messages": [USER, {"role": "assistant", "content": "A"}], "tools": '{"name": "f"}'}, "'tools' must be a list"),
    (
        {"messages": [USER, {"role": "assistant", "content": "A", "thinking": "t", "reasoning_content": "r"}]},
        "'thinking'",
    ),
    ({"input": "Q", "output": "A", "tools": [WEATHER]}, "field 'tools' is not used by the input_output format"),
]

# Chat templates built here, with transformers' {% generation %} markers around what an assistant writes.
HERMES = (  # Qwen2.5 / Hermes layout: tools in the system turn, calls in <tool_call>, results as user turns
    "{%- if tools %}<|im_start|>system\n{% if messages[0].role == 'system' %}{{ messages[0].content }}"
    "{% else %}You are a helpful assistant.{% endif %}\n\n# Tools\n<tools>{% for tool in tools %}\n"
    "{{ tool | tojson }}{% endfor %}\n</tools><|im_end|>\n"
    "{% elif messages[0].role == 'system' %}<|im_start|>system\n{{ messages[0].content }}<|im_end|>\n{% endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' %}<|im_start|>user\n{{ message.content }}<|im_end|>\n"
    "{% elif message.role == 'assistant' %}<|im_start|>assistant\n{% generation %}{{ message.content or '' }}"
    "{%- for call in message.tool_calls or [] %}\n<tool_call>\n"
    '{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}\n</tool_call>'
    "{%- endfor %}<|im_end|>\n{% endgeneration %}"
    "{%- elif message.role == 'tool' %}"
    "{%- if messages[loop.index0 - 1].role != 'tool' %}<|im_start|>user{% endif %}\n"
    "<tool_response>\n{{ message.content }}\n</tool_response>"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}<|im_end|>\n{% endif %}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAMA31 = (  # Llama 3.1 layout: tools in the first user turn, a call as JSON ending <|eom_id|>, results as ipython
    "{{- bos_token }}{%- if messages[0].role == 'system' %}{%- set system = messages[0].content %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system = '' %}{%- endif %}"
    "<|start_header_id|>system<|end_header_id|>\n\n{% if tools is not none %}Environment: ipython\n{% endif %}"
    "{{ system }}<|eot_id|>"
    "{%- if tools is not none %}{%- set first = messages[0].content %}{%- set messages = messages[1:] %}"
    "<|start_header_id|>user<|end_header_id|>\n\nGiven the following functions, respond with a JSON call.\n"
    "{% for t in tools %}{{ t | tojson(indent=4) }}\n\n{% endfor %}{{ first }}<|eot_id|>{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' %}<|start_header_id|>assistant<|end_header_id|>\n\n{% generation %}"
    "{%- if message.tool_calls %}"
    '{"name": "{{ message.tool_calls[0].function.name }}", '
    '"parameters": {{ message.tool_calls[0].function.arguments | tojson }}}<|eom_id|>'
    "{%- else %}{{ message.content | trim }}<|eot_id|>{% endif %}{% endgeneration %}"
    "{%- elif message.role == 'tool' %}<|start_header_id|>ipython<|end_header_id|>\n\n"
    "{{ message.content | tojson }}<|eot_id|>"
    "{%- else %}<|start_header_id|>{{ message.role }}<|end_header_id|>\n\n{{ message.content | trim }}<|eot_id|>"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
QWEN3 = (  # Qwen3 layout: <think> reasoning on the turns after the last user query only (earlier ones drop it)
    "{%- set ns = namespace(last_query=-1) %}"
    "{%- for m in messages %}{% if m.role == 'user' %}{% set ns.last_query = loop.index0 %}{% endif %}{% endfor %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' %}<|im_start|>assistant\n{% generation %}"
    "{%- if loop.index0 > ns.last_query and (loop.last or message.reasoning_content) %}"
    "<think>\n{{ (message.reasoning_content or '') | trim }}\n</think>\n\n{% endif %}{{ message.content or '' }}"
    "{%- for call in message.tool_calls or [] %}<tool_call>"
    '{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}</tool_call>'
    "{%- endfor %}<|im_end|>\n{% endgeneration %}"
    "{%- elif message.role == 'tool' %}<|im_start|>user\n<tool_response>{{ message.content }}</tool_response>"
    "<|im_end|>\n"
    "{%- else %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{% endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
PARTS = (  # a template that takes content as a string or as a list of parts
    "{%- macro text(c) %}{% if c is string %}{{ c }}{% else %}{% for p in c %}{% if p.type == 'text' %}"
    "{{ p.text }}{% endif %}{% endfor %}{% endif %}{% endmacro %}"
    "{%- for m in messages %}<|im_start|>{{ m.role }}\n{% if m.role == 'assistant' %}{% generation %}"
    "{{ text(m.content) }}<|im_end|>\n{% endgeneration %}{% else %}{{ text(m.content) }}<|im_end|>\n{% endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def data_mod():
    return load_stage("01_download_data.py")


def with_template(tokenizer_dir, template):
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    tok.chat_template = template
    return tok


def oracle(tok, conv):
    """(ids, 0/1 mask) of a conversation as transformers renders and marks it."""
    out = tok.apply_chat_template(
        conv["messages"], tools=conv.get("tools"), tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    return list(out["input_ids"]), list(out["assistant_masks"])


def ours(train_mod, tok, conv, train_reasoning=True):
    docs, _ = train_mod.tokenize([conv], tok, "raw", 4096, "truncate", train_reasoning=train_reasoning)
    return [(ids, [int(label != -100) for label in labels]) for ids, labels in docs]


def trained_text(tok, ids, mask):
    return tok.decode([t for t, m in zip(ids, mask) if m])


# ------------------------------------------------------------------ 01: the shapes exports hold
@pytest.mark.parametrize("record,normalized", [s[1:] for s in SHAPES], ids=[s[0] for s in SHAPES])
def test_each_agent_shape_is_normalized_to_the_openai_shape_templates_render(data_mod, record, normalized):
    assert data_mod.normalize(record)[0] == normalized


@pytest.mark.parametrize("record,reason", BAD, ids=[r for _, r in BAD])
def test_a_malformed_agent_record_is_a_bad_line_with_its_reason(data_mod, record, reason):
    with pytest.raises(data_mod.BadRecord) as bad:
        data_mod.normalize(record)
    assert reason in bad.value.reason


def test_05_reads_what_01_writes_and_sends_an_export_shape_to_01(train_mod):
    assert train_mod.training_record(TOOL_CHAT) == TOOL_CHAT
    with pytest.raises(train_mod.BadRecord, match="message 1: content must be a string, got list"):
        train_mod.training_record(SHAPES[3][1])


# ------------------------------------------------------------------ 05: what trains, against transformers' mask
@pytest.mark.parametrize("template", [HERMES, LLAMA31], ids=["hermes", "llama3.1"])
def test_tool_calls_train_and_tool_results_schema_system_and_user_text_do_not(train_mod, tokenizer_dir, template):
    tok = with_template(tokenizer_dir, template)
    (doc,) = ours(train_mod, tok, TOOL_CHAT)
    assert doc == oracle(tok, TOOL_CHAT)
    trained = trained_text(tok, *doc)
    assert "get_weather" in trained and "Paris" in trained and "It is 18 C and sunny." in trained
    assert "sunny\n" not in trained and "Weather of a city" not in trained and "Use tools." not in trained


def test_reasoning_and_tool_calls_of_one_round_train_as_transformers_marks_them(train_mod, tokenizer_dir):
    tok = with_template(tokenizer_dir, QWEN3)
    (doc,) = ours(train_mod, tok, REASONING_CHAT)
    assert doc == oracle(tok, REASONING_CHAT)
    assert "<think>\nI should ask the tool.\n</think>" in trained_text(tok, *doc)


def test_a_turn_the_template_renders_otherwise_later_trains_in_its_own_document(train_mod, tokenizer_dir):
    """Qwen3's template drops the reasoning of earlier rounds: the first answer trains with its reasoning, as the model
    writes it, in the conversation up to it; the whole conversation trains its last answer only."""
    tok = with_template(tokenizer_dir, QWEN3)
    first, whole = ours(train_mod, tok, TWO_ROUNDS)
    assert first == oracle(tok, {"messages": TWO_ROUNDS["messages"][:2]})
    ids, mask = oracle(tok, TWO_ROUNDS)
    before = tok.apply_chat_template(TWO_ROUNDS["messages"][:3], add_generation_prompt=True, tokenize=True)
    last_turn = len(before["input_ids"])
    assert whole == (ids, [0] * last_turn + mask[last_turn:])
    assert trained_text(tok, *first) == "<think>\nTwo and two.\n</think>\n\n4<|im_end|>\n"


def test_without_train_reasoning_the_reasoning_is_context_and_the_rest_of_the_turn_trains(train_mod, tokenizer_dir):
    tok = with_template(tokenizer_dir, QWEN3)
    (doc,) = ours(train_mod, tok, REASONING_CHAT, train_reasoning=False)
    ids, mask = oracle(tok, REASONING_CHAT)
    assert doc[0] == ids and sum(doc[1]) < sum(mask) and all(m >= d for m, d in zip(mask, doc[1]))
    trained = trained_text(tok, *doc)
    assert "I should ask" not in trained and "The tool said" not in trained
    assert trained.startswith("\n</think>\n\n<tool_call>") and trained.endswith("18 C.<|im_end|>\n")


def test_content_parts_train_as_a_template_that_takes_parts_renders_them(train_mod, data_mod, tokenizer_dir):
    tok = with_template(tokenizer_dir, PARTS)
    record = {"messages": [{k: v for k, v in m.items() if k != "thinking"} for m in SHAPES[3][1]["messages"]]}
    (doc,) = ours(train_mod, tok, data_mod.normalize(record)[0])
    assert doc == oracle(tok, record)


@pytest.mark.parametrize(
    "conv,what",
    [(TOOL_CHAT, "tools"), ({"messages": TOOL_CHAT["messages"]}, "tool_calls"), (TWO_ROUNDS, "reasoning_content")],
    ids=["tools", "tool-calls", "reasoning"],
)
def test_a_template_that_would_drop_tools_or_reasoning_is_refused_naming_record_and_template(
    train_mod, tokenizer_dir, conv, what
):
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))  # a plain role/content template
    with pytest.raises(train_mod.StageError, match=f"^d.jsonl:3: this conversation has {what}, .*{tokenizer_dir}"):
        train_mod.tokenize([conv], tok, "raw", 4096, "truncate", labels=["d.jsonl:3"])


def test_a_template_that_leaves_out_tool_results_is_refused(train_mod, tokenizer_dir):
    tok = with_template(tokenizer_dir, HERMES.replace("{{ message.content }}\n</tool_response>", "</tool_response>"))
    with pytest.raises(train_mod.StageError, match="record 1: .* drops the tool result, message 4"):
        train_mod.tokenize([TOOL_CHAT], tok, "raw", 4096, "truncate")


# ------------------------------------------------------------------ through 01 and 05, from users' files
def write_source(path, kind, records):
    if kind == "parquet":
        pq.write_table(pa.Table.from_pylist(records), path)
    else:
        path.write_text(json.dumps(records) if kind == "json-array" else "".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.mark.parametrize("kind", ["jsonl", "json-array", "parquet"])
@pytest.mark.parametrize("shape,record,normalized", SHAPES, ids=[s[0] for s in SHAPES])
def test_01_reads_each_agent_shape_from_every_file_kind_and_05_prepares_it_as_in_memory(
    train_mod, tokenizer_dir, tmp_path, kind, shape, record, normalized
):
    """A columnar file holds one type per column, so each shape is a file of its own (two records: a table
    fills with nulls the keys that one record's messages lack and another's have)."""
    other = json.loads(json.dumps(record).replace("Paris", "Lyon").replace("2 + 2", "3 + 3"))
    source = write_source(tmp_path / f"src.{'json' if kind == 'json-array' else kind}", kind, [record, other])
    out, tok_dir = tmp_path / "agent.jsonl", tmp_path / "tok"
    shutil.copytree(tokenizer_dir, tok_dir)
    tok = with_template(tok_dir, QWEN3.replace("{%- for message", "{{ tools | tojson }}{%- for message"))
    tok.save_pretrained(str(tok_dir))
    overlay = write_overlay(
        tmp_path / "o.yaml",
        {"data.download.train_uri": str(source), "data.download.val_uri": None, "data.train_dir": str(out)},
    )
    run_stage(["01_download_data.py", "--config", "config.yaml", "--config", str(overlay)])
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert written[0] == normalized and len(written) == 2
    keys = [f"data.train_dir={out}", f"data.tokenizer.type={tok_dir}", "data.dev_choose_samples=null"]
    c = train_mod.resolve(
        train_mod.load_config([ROOT / "config.yaml"], keys + ["data.seq_length=512"]), train_mod.SCHEMA
    )
    windows = train_mod.load_split(out, tok, c, "train", None)
    docs, _ = train_mod.tokenize(written, tok, "raw", 512, "truncate")
    expected = train_mod.Windows.from_docs(docs, 512, True, tok.pad_token_id)
    got, want = windows.batch(range(len(windows))), expected.batch(range(len(expected)))
    assert len(windows) == len(expected) and all((got[k] == want[k]).all() for k in want)


def test_05_trains_on_tool_call_conversations_that_01_wrote(pipeline, tmp_path):
    """The LLaMA-Factory shape through 01, then 05 under a tool template: the baseline validation loss is the mean
    cross-entropy over exactly the tokens transformers marks, and training lowers it."""
    import torch
    import torch.nn.functional as F
    from transformers import LlamaForCausalLM

    work, overlay = pipeline
    tok_dir = tmp_path / "tok"
    shutil.copytree(work / "tokenizer", tok_dir)
    tok = with_template(tok_dir, HERMES)
    tok.save_pretrained(str(tok_dir))
    source = write_source(tmp_path / "lf.jsonl", "jsonl", [SHAPES[2][1]] * 8)
    out = tmp_path / "agent.jsonl"
    data = {"data.download.train_uri": str(source), "data.download.val_uri": str(source), "data.train_dir": str(out)}
    run_stage(
        [
            "01_download_data.py",
            "--config",
            "config.yaml",
            "--config",
            str(overlay),
            "--config",
            str(write_overlay(tmp_path / "o.yaml", dict(data, **{"data.val_dir": str(tmp_path / "val.jsonl")}))),
        ]
    )
    keys = [f"data.train_dir={out}", f"data.val_dir={tmp_path / 'val.jsonl'}", f"data.tokenizer.type={tok_dir}"]
    keys += ["data.seq_length=512", "evaluation.generate.num_prompts=0", "trainer.val_check_interval=4"]
    metrics = train(work, overlay, "agent", *keys, "trainer.max_steps=4")
    ids, mask = oracle(tok, json.loads(out.read_text().splitlines()[0]))
    model = LlamaForCausalLM.from_pretrained(str(work / "hf_weights")).eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1]
    targets = torch.tensor([t if m else -100 for t, m in zip(ids, mask)])[1:]
    assert metrics[0]["val_loss"] == pytest.approx(F.cross_entropy(logits, targets).item(), abs=1e-5)
    assert metrics[-1]["val_loss"] < metrics[0]["val_loss"]


# ------------------------------------------------------------------ several training sources mixed by ratio
def sources(train_mod, tokenizer_dir, tmp_path, sizes, *keys):
    """Data files of single-turn records named a, b, ... with these many records, and 05's config for them."""
    paths = []
    for name, n in zip("abc", sizes):
        paths.append(tmp_path / f"{name}.jsonl")
        paths[-1].write_text(
            "".join(json.dumps({"input": f"{name} {i}?", "output": f"{name}{i}."}) + "\n" for i in range(n))
        )
    keys = [f"data.tokenizer.type={tokenizer_dir}", "data.dev_choose_samples=null", "data.seq_length=16", *keys]
    return paths, train_mod.resolve(train_mod.load_config([ROOT / "config.yaml"], keys), train_mod.SCHEMA)


def split(train_mod, tokenizer_dir, path, c):
    return train_mod.load_split(path, AutoTokenizer.from_pretrained(str(tokenizer_dir)), c, "train", None)


def test_each_epoch_of_a_mixture_holds_each_source_s_share_drawn_from_the_seed(train_mod):
    sources = ((10, 30), (40, 20))  # the first repeated 3 times, the second sampled to half
    epochs = [train_mod.epoch_order(sources, 7, e).tolist() for e in range(3)]
    assert epochs[0] == train_mod.epoch_order(sources, 7, 0).tolist() != train_mod.epoch_order(sources, 8, 0).tolist()
    for order in epochs:
        first, second = [w for w in order if w < 10], [w for w in order if w >= 10]
        assert len(order) == 50 and sorted(first) == sorted(list(range(10)) * 3)
        assert len(second) == len(set(second)) == 20 and all(10 <= w < 50 for w in second)
    assert {w for w in epochs[0] if w >= 10} != {w for w in epochs[1] if w >= 10}  # another sample each epoch
    steps = [train_mod.step_indices(s, sources, 25, 7) for s in range(4)]
    assert steps[0] + steps[1] == epochs[0] and steps[2] + steps[3] == epochs[1]


def test_a_mixture_by_size_draws_every_window_once_per_epoch(train_mod, tokenizer_dir, tmp_path, capsys):
    (a, b), c = sources(train_mod, tokenizer_dir, tmp_path, (6, 18))
    na, nb = (len(split(train_mod, tokenizer_dir, p, c)) for p in (a, b))
    mix = split(train_mod, tokenizer_dir, [a, b], c)
    assert mix.sources == ((na, na), (nb, nb)) and len(mix) == na + nb
    assert sorted(train_mod.epoch_order(mix.sources, 3, 0).tolist()) == list(range(na + nb))
    share = f"{nb / (na + nb):.1%}"
    assert f"train mix: {b}: {nb:,} windows per epoch ({share}) from its {nb:,}\n" in capsys.readouterr().out


def test_several_sources_prepare_as_one_split_of_each_one_s_windows_keyed_on_every_source(
    train_mod, tokenizer_dir, tmp_path, capsys
):
    (a, b), c = sources(train_mod, tokenizer_dir, tmp_path, (6, 40), "data.mix=[3, 1]")
    one, other, mix = (split(train_mod, tokenizer_dir, p, c) for p in (a, b, [a, b]))
    got, want = mix.batch(range(len(mix))), [one.batch(range(len(one))), other.batch(range(len(other)))]
    assert all((got[k] == torch.cat([w[k] for w in want])).all() for k in got)  # no window spans two sources
    assert mix.inputs["data_sha256"] == [one.inputs["data_sha256"], other.inputs["data_sha256"]]
    total = len(one) + len(other)
    assert mix.sources == ((len(one), round(total * 0.75)), (len(other), round(total * 0.25)))
    assert mix.mix[str(a)] == {
        "windows": len(one),
        "per_epoch": round(total * 0.75),
        "share": pytest.approx(0.75, 0.02),
    }
    assert "each about" in capsys.readouterr().out.splitlines()[-2]  # the small source repeats, and says so
    before = train_mod.prepared_location([a, b], tokenizer_dir, c)[0]
    b.write_text(b.read_text() + json.dumps({"input": "new?", "output": "new."}) + "\n")  # another source content
    assert train_mod.prepared_location([a, b], tokenizer_dir, c)[0] != before


def test_a_mix_needs_one_weight_per_training_source(train_mod):
    keys = ["data.train_dir=[a.jsonl, b.jsonl]", "data.mix=[1.0]"]
    c = train_mod.resolve(train_mod.load_config([ROOT / "config.yaml"], keys), train_mod.SCHEMA)
    with pytest.raises(train_mod.StageError, match="'data.mix' has 1 weight.* for 2 source"):
        train_mod.check_settings(c, launched=False)
    with pytest.raises(train_mod.StageError, match="'data.train_dir' must be path, got list"):
        train_mod.resolve(train_mod.load_config([ROOT / "config.yaml"], ["data.train_dir=[]"]), train_mod.SCHEMA)


def test_01_writes_each_training_source_to_its_own_file_and_refuses_a_count_mismatch(tmp_path):
    sources = [write_source(tmp_path / f"s{i}.jsonl", "jsonl", [SHAPES[i][1]]) for i in range(2)]
    outs = [tmp_path / "out" / f"t{i}.jsonl" for i in range(2)]
    values = {"data.download.train_uri": [str(s) for s in sources], "data.download.val_uri": None}
    overlay = write_overlay(tmp_path / "o.yaml", dict(values, **{"data.train_dir": [str(o) for o in outs]}))
    run_stage(["01_download_data.py", "--config", "config.yaml", "--config", str(overlay)])
    assert [json.loads(o.read_text()) for o in outs] == [SHAPES[0][2], SHAPES[1][2]]
    overlay = write_overlay(tmp_path / "o2.yaml", dict(values, **{"data.train_dir": str(outs[0])}))
    proc = run_stage(["01_download_data.py", "--config", "config.yaml", "--config", str(overlay)], check=False)
    assert proc.returncode == 1 and "names 2 source(s) and data.train_dir 1 file(s)" in proc.stderr
