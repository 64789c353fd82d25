"""Data as users hold it: every common record format and file kind, read alike by 01 and 05; conversations train
their assistant turns and nothing else."""

import gzip
import json
import shutil

import pytest
from conftest import ROOT, load_stage, run_stage, write_overlay
from transformers import AutoTokenizer

SYSTEM = {"role": "system", "content": "Answer tersely."}
CHAT = [
    SYSTEM,
    {"role": "user", "content": "What is 4 + 2?"},
    {"role": "assistant", "content": "6"},
    {"role": "user", "content": "And times 3?"},
    {"role": "assistant", "content": "18"},
]

# One record of each format and what it is normalized to.
FORMATS = [
    ("input_output", {"input": "Q", "output": "A", "id": 7}, {"input": "Q", "output": "A", "id": 7}),
    (
        "dolly",
        {"instruction": "Summarize.", "context": "Long text.", "response": "Short.", "category": "s"},
        {"input": "Summarize.\n\nLong text.", "output": "Short.", "category": "s"},
    ),
    (
        "alpaca",
        {"instruction": "Translate.", "input": "chat", "output": "cat"},
        {"input": "Translate.\n\nchat", "output": "cat"},
    ),
    (
        "alpaca",
        {"instruction": "Name a colour.", "input": "", "output": "red", "text": "### Instruction ..."},
        {"input": "Name a colour.", "output": "red", "text": "### Instruction ..."},
    ),
    ("alpaca", {"instruction": "Name a colour.", "output": "red"}, {"input": "Name a colour.", "output": "red"}),
    (
        "prompt_completion",
        {"prompt": "The sky is", "completion": " blue."},
        {"input": "The sky is", "output": " blue."},
    ),
    (
        "prompt_completion",
        {"prompt": CHAT[:4], "completion": CHAT[4:]},
        {"messages": CHAT[:2] + [dict(CHAT[2], train=False)] + CHAT[3:]},
    ),
    ("messages", {"messages": CHAT}, {"messages": CHAT}),
    (
        "sharegpt",
        {
            "conversations": [
                {"from": "system", "value": "Answer tersely."},
                {"from": "human", "value": "What is 4 + 2?"},
                {"from": "gpt", "value": "6"},
                {"from": "human", "value": "And times 3?"},
                {"from": "gpt", "value": "18"},
            ]
        },
        {"messages": CHAT},
    ),
]

BAD = [
    ({"input": "Q", "output": "A", "response": "R"}, "field 'response' is not used by the input_output format"),
    ({"instruction": "I", "context": "C"}, "missing field 'response'"),
    ({"question": "Q", "answer": "A"}, "fields found: ['answer', 'question']"),
    ({"input": "Q", "output": "  "}, "empty output"),
    ({"instruction": "", "output": "A"}, "empty prompt"),
    ({"input": "Q", "output": 3}, "field 'output' must be a string, got int"),
    ({"messages": CHAT[:2]}, "without an assistant turn"),
    ({"messages": CHAT[1:4]}, "ends on a user turn"),
    ({"messages": [CHAT[1], SYSTEM, CHAT[2]]}, "a system message may only come first"),
    ({"messages": [CHAT[1], {"role": "bot", "content": "x"}, CHAT[2]]}, "unknown role 'bot'"),
    ({"messages": [CHAT[1], {"role": "tool", "content": "x"}, CHAT[2]]}, "a tool result must follow a tool call"),
    ({"messages": [CHAT[1], {"role": "assistant", "content": ""}]}, "message 2 (assistant) is empty"),
    ({"messages": [{"role": "assistant", "content": "hi"}, CHAT[1], CHAT[2]]}, "must be the user's"),
    ({"conversations": [{"from": "human", "value": "Q"}, {"from": "bot", "value": "A"}]}, "unknown 'from' 'bot'"),
    ({"prompt": CHAT[:2], "completion": "6"}, "so 'completion' must be one too"),
]


@pytest.fixture(scope="module")
def data_mod():
    return load_stage("01_download_data.py")


def read_01(data_mod, source):
    """The normalized records of a source as 01 reads and writes them."""
    return [data_mod.normalize(data_mod.parse_row(item))[0] for _, item in data_mod.data_rows(source)]


def as_05_reads(normalized):
    return [
        (n["input"], n["output"]) if "input" in n else {k: n[k] for k in ("messages", "tools") if k in n}
        for n in normalized
    ]


# ------------------------------------------------------------------ one reader: 01's
@pytest.mark.parametrize("fmt,record,normalized", FORMATS, ids=[f"{f[0]}-{i}" for i, f in enumerate(FORMATS)])
def test_each_format_is_recognised_by_its_fields_and_normalized(data_mod, fmt, record, normalized):
    assert data_mod.normalize(record) == (normalized, fmt)
    assert data_mod.normalize(record, fmt) == (normalized, fmt)  # data.format forcing the same one


@pytest.mark.parametrize("record,reason", BAD, ids=[r for _, r in BAD])
def test_a_record_that_cannot_train_is_a_bad_record_with_its_reason(data_mod, record, reason):
    with pytest.raises(data_mod.BadRecord) as bad:
        data_mod.normalize(record)
    assert reason in bad.value.reason


def test_a_forced_format_refuses_the_fields_it_would_not_use(data_mod):
    """An Alpaca record read as input/output would drop its instruction: an error, never a silent drop."""
    with pytest.raises(data_mod.BadRecord, match="field 'instruction' is not used by the input_output format"):
        data_mod.normalize({"instruction": "I", "input": "Q", "output": "A"}, "input_output")


def test_a_record_that_does_not_fit_the_forced_format_is_named_so(data_mod):
    with pytest.raises(data_mod.BadRecord, match="its fields do not fit the alpaca format that data.format asks for"):
        data_mod.normalize({"instruction": "I", "response": "R"}, "alpaca")  # a dolly record


def test_renamed_fields_are_recognised(data_mod):
    assert data_mod.normalize(
        {"question": "Q", "answer": "A"}, renames=[("question", "input"), ("answer", "output")]
    ) == ({"input": "Q", "output": "A"}, "input_output")


# ------------------------------------------------------------------ file kinds, through 01 and 05
RECORDS = [record for _, record, _ in FORMATS]


def write_kind(path, kind):
    """RECORDS written as a file (or directory) of `kind`; returns its path."""
    import datasets

    lines = [json.dumps(r, ensure_ascii=False) for r in RECORDS]
    if kind == "jsonl-bom-crlf":
        path = path / "d.jsonl"
        path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode() + b"\r\n")
    elif kind == "jsonl.gz":
        path = path / "d.jsonl.gz"
        path.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    elif kind == "json-array":
        path = path / "d.json"
        path.write_text(json.dumps(RECORDS, indent=1))
    else:  # parquet, arrow and save_to_disk hold one table: a column per field, null where a record lacks it
        rows = RECORDS[:6]  # the single-turn ones: a table's columns are the union of their fields
        columns = sorted({k for r in rows for k in r})
        ds = datasets.Dataset.from_dict({k: [r.get(k) for r in rows] for k in columns})
        if kind == "parquet":
            path = path / "d.parquet"
            ds.to_parquet(str(path))
        elif kind == "save_to_disk":
            path = path / "d"
            ds.save_to_disk(str(path))
        else:
            ds.save_to_disk(str(path / "ds"))
            path = next((path / "ds").glob("*.arrow"))
    return path


def expected_for(kind):
    normalized = [n for _, _, n in FORMATS]
    return normalized[:6] if kind in ("parquet", "arrow", "save_to_disk") else normalized


KINDS = ["jsonl-bom-crlf", "jsonl.gz", "json-array", "parquet", "arrow", "save_to_disk"]


@pytest.mark.parametrize("kind", KINDS)
def test_01_reads_every_file_kind_and_writes_normalized_records_that_05_reads(train_mod, tmp_path, kind):
    source = write_kind(tmp_path, kind)
    out = tmp_path / "out" / "train.jsonl"
    overlay = write_overlay(
        tmp_path / "o.yaml",
        {"data.download.train_uri": str(source), "data.download.val_uri": None, "data.train_dir": str(out)},
    )
    run_stage(["01_download_data.py", "--config", "config.yaml", "--config", str(overlay)])
    assert [json.loads(line) for line in out.read_text().splitlines()] == expected_for(kind)
    manifest = json.loads((tmp_path / "out" / "train.jsonl.manifest.json").read_text())
    assert sum(manifest["formats"].values()) == len(expected_for(kind)) and manifest["formats"]["alpaca"] == 3
    assert train_mod.read_records(out, "train", None) == as_05_reads(expected_for(kind))


def test_a_datasetdict_directory_is_read_by_the_split_it_names_and_never_by_a_guess(data_mod, tmp_path):
    """<dir>:<split> names a split; a DatasetDict of one split needs no name; of several, a name is required (the
    validation source used to be read as the train split)."""
    import datasets

    def table(prefix):
        return datasets.Dataset.from_dict({"input": [f"{prefix}-q"], "output": [f"{prefix}-a"]})

    datasets.DatasetDict({"train": table("t"), "validation": table("v")}).save_to_disk(str(tmp_path / "both"))
    datasets.DatasetDict({"validation": table("v")}).save_to_disk(str(tmp_path / "one"))
    assert read_01(data_mod, f"{tmp_path / 'both'}:validation") == [{"input": "v-q", "output": "v-a"}]
    assert read_01(data_mod, tmp_path / "one") == [{"input": "v-q", "output": "v-a"}]
    with pytest.raises(data_mod.StageError, match=r"a DatasetDict of splits \['train', 'validation'\]; name the one"):
        read_01(data_mod, tmp_path / "both")
    with pytest.raises(data_mod.StageError, match=r"no split 'test' in this DatasetDict \(splits: \['train', 'valid"):
        read_01(data_mod, f"{tmp_path / 'both'}:test")


def test_conversations_in_a_parquet_file_are_read_with_their_turns(data_mod, tmp_path):
    import datasets

    marked = CHAT[:2] + [dict(CHAT[2], train=False)] + CHAT[3:]
    datasets.Dataset.from_dict({"messages": [CHAT, marked]}).to_parquet(str(tmp_path / "chat.parquet"))
    assert read_01(data_mod, tmp_path / "chat.parquet") == [{"messages": CHAT}, {"messages": marked}]


def test_a_non_utf8_line_is_a_bad_line_named_in_both_stages(train_mod, tmp_path):
    source = tmp_path / "d.jsonl"
    source.write_bytes(
        json.dumps(RECORDS[0]).encode()
        + b"\n"
        + b'{"input": "caf\xe9", "output": "x"}\n'
        + json.dumps(RECORDS[1]).encode()
        + b"\n"
    )
    with pytest.raises(train_mod.StageError, match=r"d.jsonl:2: not UTF-8 text \(byte 0xe9"):
        train_mod.read_records(source, "train", None)
    out = tmp_path / "out.jsonl"
    base = [
        "01_download_data.py",
        "--config",
        "config.yaml",
        f"data.download.train_uri={source}",
        "data.download.val_uri=null",
        f"data.train_dir={out}",
    ]
    proc = run_stage(base, check=False)
    assert proc.returncode == 1 and f"{source}:2: not UTF-8 text" in proc.stderr
    run_stage(base + ["data.download.bad_lines=skip"])
    manifest = json.loads((tmp_path / "out.jsonl.manifest.json").read_text())
    assert manifest["records"] == 2 and manifest["rejected_by_reason"] == {"not UTF-8": 1}
    assert manifest["rejected_lines"][0]["line"] == 2


def test_01_counts_records_per_format_and_rejections_per_reason(tmp_path):
    source = tmp_path / "d.jsonl"
    bad = [{"input": "Q", "output": ""}, {"messages": CHAT[1:4]}, {"input": "Q", "output": ""}]
    source.write_text("".join(json.dumps(r) + "\n" for r in RECORDS + bad))
    out = tmp_path / "out.jsonl"
    run_stage(
        [
            "01_download_data.py",
            "--config",
            "config.yaml",
            f"data.download.train_uri={source}",
            "data.download.val_uri=null",
            f"data.train_dir={out}",
            "data.download.bad_lines=skip",
        ]
    )
    manifest = json.loads((tmp_path / "out.jsonl.manifest.json").read_text())
    assert manifest["formats"] == {
        "input_output": 1,
        "dolly": 1,
        "alpaca": 3,
        "prompt_completion": 2,
        "messages": 1,
        "sharegpt": 1,
    }
    assert manifest["rejected_by_reason"] == {"empty output": 2, "ends on a user turn": 1}


# ------------------------------------------------------------------ conversations: what trains
LLAMA3_STYLE = (  # Llama 3's layout, with transformers' {% generation %} markers around what an assistant says
    "{% for m in messages %}<s>{{ m['role'] }}\n\n{% if m['role'] == 'assistant' %}{% generation %}"
    "{{ m['content'] }}</s>{% endgeneration %}{% else %}{{ m['content'] }}</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n\n{% endif %}"
)


@pytest.fixture(scope="module")
def llama3_style(tokenizer_dir, tmp_path_factory):
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    tok.chat_template = LLAMA3_STYLE
    return tok


def test_conversation_trains_exactly_what_transformers_marks_as_assistant_tokens(train_mod, llama3_style):
    conversations = [CHAT, CHAT[1:3], [CHAT[1], CHAT[2], CHAT[3], {"role": "assistant", "content": "It is 18."}]]
    docs, _ = train_mod.tokenize(conversations, llama3_style, "raw", 512, "truncate")
    for conv, (ids, labels) in zip(conversations, docs):
        theirs = llama3_style.apply_chat_template(
            conv, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        assert ids == list(theirs["input_ids"])
        assert [int(label != -100) for label in labels] == list(theirs["assistant_masks"])


def test_conversations_render_through_transformers_compiled_template_as_apply_chat_template_does(
    train_mod, llama3_style, monkeypatch
):
    """render_chats renders with transformers' private _compile_jinja_template (apply_chat_template's per-message
    conversions cost more than the rendering): this fails loudly when a transformers release moves or changes it,
    instead of the slower public path being taken without a word."""
    from transformers.utils.chat_template_utils import _compile_jinja_template  # noqa: F401

    public, calls = llama3_style.apply_chat_template, []
    monkeypatch.setattr(llama3_style, "apply_chat_template", lambda b, **kw: calls.append(len(b)) or public(b, **kw))
    conversations = [CHAT, CHAT[1:3], CHAT[:3]]
    texts = train_mod.render_chats(llama3_style, conversations, generation_prompt=False)
    assert calls == [1]  # the public path renders only the first conversation, the check of the fast one
    assert texts == [public(c, tokenize=False) for c in conversations]


def test_an_assistant_turn_marked_train_false_is_context_only(train_mod, llama3_style):
    conv = CHAT[:2] + [dict(CHAT[2], train=False)] + CHAT[3:]
    ((ids, labels),) = train_mod.tokenize([conv], llama3_style, "raw", 512, "truncate")[0]
    trained = llama3_style.decode([t for t, label in zip(ids, labels) if label != -100])
    assert trained == "18</s>"


def test_a_single_turn_record_and_its_conversation_train_the_same_tokens(train_mod, llama3_style):
    single = train_mod.tokenize([("What is 4 + 2?", "6")], llama3_style, "chat_template", 512, "truncate")[0]
    chat = train_mod.tokenize([CHAT[1:3]], llama3_style, "raw", 512, "truncate")[0]
    assert single == chat


def test_conversations_without_a_chat_template_are_one_clear_error(train_mod, tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    tok.chat_template = None
    with pytest.raises(train_mod.StageError, match="record 1: a conversation .* has none"):
        train_mod.tokenize([CHAT], tok, "raw", 512, "truncate")


def test_a_template_whose_prefixes_are_not_prefixes_is_refused_naming_the_record(train_mod, tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{% if loop.last %} [end]"
        "{% endif %}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
    )
    with pytest.raises(train_mod.StageError, match=r"data.jsonl:4: .*up to message 3 as a prefix"):
        train_mod.tokenize([CHAT], tok, "raw", 512, "truncate", labels=["data.jsonl:4"])


def test_a_conversation_the_template_refuses_is_named(train_mod, tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'user' and m['content'] == 'bad' %}"
        "{{ raise_exception('no such question') }}{% endif %}{{ m['content'] }}{% endfor %}"
    )
    bad = [{"role": "user", "content": "bad"}, {"role": "assistant", "content": "A"}]
    with pytest.raises(
        train_mod.StageError,
        match=r"d.jsonl:9: the tokenizer's chat template refuses this "
        r"conversation \(TemplateError: no such question\)",
    ):
        train_mod.tokenize([CHAT[1:3], bad], tok, "raw", 512, "truncate", labels=["d.jsonl:8", "d.jsonl:9"])


def test_a_long_conversation_keeps_its_turns_up_to_the_last_answer_that_fits(train_mod, llama3_style):
    ((full_ids, _),) = train_mod.tokenize([CHAT], llama3_style, "raw", 512, "truncate")[0]
    first_turn_end = len(llama3_style.apply_chat_template(CHAT[:3], tokenize=True)["input_ids"])
    docs, stats = train_mod.tokenize([CHAT], llama3_style, "raw", len(full_ids) - 1, "truncate")
    ((ids, labels),) = docs
    assert stats["truncated"] == 1 and ids == full_ids[:first_turn_end]
    assert llama3_style.decode([t for t, label in zip(ids, labels) if label != -100]) == "6</s>"
    docs, stats = train_mod.tokenize([CHAT], llama3_style, "raw", len(full_ids) - 1, "drop")
    assert docs == [] and stats["dropped"] == 1


def test_a_conversation_whose_first_answer_does_not_fit_is_cut_prompt_first(train_mod, llama3_style):
    long_question = [SYSTEM, {"role": "user", "content": "word " * 60}, CHAT[2], CHAT[3], CHAT[4]]
    ((ids, labels),) = train_mod.tokenize([long_question], llama3_style, "raw", 24, "truncate")[0]
    answer = llama3_style.encode("6</s>", add_special_tokens=False)
    assert len(ids) == 24 and ids[-len(answer) :] == answer and labels[-len(answer) :] == answer
    assert all(label == -100 for label in labels[: -len(answer)])


# ------------------------------------------------------------------ 05 on users' files
@pytest.mark.parametrize("kind,fmt", [("json-array", "raw"), ("jsonl.gz", "chat_template"), ("parquet", "raw")])
def test_every_format_01_writes_trains_in_05_as_its_normalized_records(
    train_mod, llama3_style, tokenizer_dir, tmp_path, kind, fmt
):
    """Each record format and file kind, through 01 then prepared by 05, gives exactly the windows of the
    normalized records (the forms FORMATS asserts) tokenized in memory."""
    out = tmp_path / "normalized.jsonl"
    overlay = write_overlay(
        tmp_path / "o.yaml",
        {
            "data.download.train_uri": str(write_kind(tmp_path, kind)),
            "data.download.val_uri": None,
            "data.train_dir": str(out),
        },
    )
    run_stage(["01_download_data.py", "--config", "config.yaml", "--config", str(overlay)])
    keys = [f"data.train_dir={out}", f"data.tokenizer.type={tokenizer_dir}", "data.dev_choose_samples=null"]
    keys += ["data.seq_length=64", f"data.prompt_format={fmt}"]
    c = train_mod.resolve(train_mod.load_config([ROOT / "config.yaml"], keys), train_mod.SCHEMA)
    windows = train_mod.load_split(out, llama3_style, c, "train", None)
    docs, _ = train_mod.tokenize(as_05_reads(expected_for(kind)), llama3_style, fmt, 64, "truncate")
    expected = train_mod.Windows.from_docs(docs, 64, True, llama3_style.pad_token_id)
    got, want = windows.batch(range(len(windows))), expected.batch(range(len(expected)))
    assert all((got[k] == want[k]).all() for k in want) and len(windows) == len(expected)


def test_the_preparation_line_says_how_many_records_of_the_file_it_took(train_mod, tokenizer_dir, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"input": f"q{i}", "output": f"a{i}"}) + "\n" for i in range(50)))
    c = train_mod.resolve(
        train_mod.load_config(
            [ROOT / "config.yaml"],
            [
                f"data.train_dir={data}",
                f"data.tokenizer.type={tokenizer_dir}",
                "data.dev_choose_samples=3",
                "data.seq_length=64",
            ],
        ),
        train_mod.SCHEMA,
    )
    train_mod.load_split(data, AutoTokenizer.from_pretrained(str(tokenizer_dir)), c, "train", None)
    assert "train: 3 of 50 records ->" in capsys.readouterr().out


def test_inspect_data_shows_a_conversation_with_its_assistant_turns_marked(train_mod, llama3_style, capsys):
    docs, _ = train_mod.tokenize([CHAT], llama3_style, "raw", 128, "truncate")
    windows = train_mod.Windows.from_docs(docs, 128, True, llama3_style.pad_token_id)
    train_mod.inspect_data(windows.batch([0]), llama3_style, 1)
    out = capsys.readouterr().out
    assert "<s>assistant\n\n[[6</s>]]<s>user\n\nAnd times 3?</s><s>assistant\n\n[[18</s>]]" in out
    assert "[[Answer" not in out and "[[What" not in out


def test_01_refuses_an_hf_uri_it_cannot_read(tmp_path):
    proc = run_stage(
        [
            "01_download_data.py",
            "--config",
            "config.yaml",
            "data.download.train_uri=hf://models/x",
            "data.download.val_uri=null",
            f"data.train_dir={tmp_path / 'o.jsonl'}",
        ],
        check=False,
    )
    assert proc.returncode == 1 and "expected hf://datasets/<owner>/<name>[:split]" in proc.stderr
    shutil.rmtree(tmp_path, ignore_errors=True)
