"""SFT data semantics: prompt masking, packing with document isolation, static shapes, truncation."""

import json

import pytest
import torch
from conftest import tiny_llama
from transformers import AutoTokenizer

RECORDS = [
    ("What is 4 + 2?\n", "6"),
    ("Write 'stone' in capital letters.\n", "STONE"),
    ("Reverse the order of these words: red fox sun\n", "sun fox red"),
    ("Convert 7 km to meters.\n", "7000 m"),
]


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


def windows(train, tok, records, seq_len, packing, fmt="raw"):
    docs, stats = train.tokenize(records, tok, fmt, seq_len, "truncate")
    prepared = train.Windows.from_docs(docs, seq_len, packing, tok.pad_token_id)
    return prepared.batch(range(len(prepared))), docs, stats


def response_positions(batch):
    """{(window, position)} of the tokens that a target asks the model to predict."""
    w, t = torch.nonzero(batch["targets"] != -100, as_tuple=True)
    return set(zip(w.tolist(), (t + 1).tolist()))


def rendered_lengths(tok, fmt, prompt, response):
    """(prompt tokens, whole record's tokens), rendered here from the record itself, not by 05."""
    if fmt == "raw":
        p = 1 + len(tok.encode(prompt, add_special_tokens=False))
        return p, p + len(tok.encode(response, add_special_tokens=False)) + 1
    user = [{"role": "user", "content": prompt}]
    p = len(tok.apply_chat_template(user, add_generation_prompt=True, tokenize=True)["input_ids"])
    full = tok.apply_chat_template(user + [{"role": "assistant", "content": response}], tokenize=True)["input_ids"]
    return p, len(full)


@pytest.mark.parametrize("packing", [True, False], ids=["packed", "padded"])
@pytest.mark.parametrize("fmt", ["raw", "chat_template"])
def test_prompt_tokens_never_carry_a_label(train_mod, tok, packing, fmt):
    batch, _, _ = windows(train_mod, tok, RECORDS, 64, packing, fmt)
    expected = set()
    w, start = 0, 0
    for prompt, response in RECORDS:
        n_prompt, n = rendered_lengths(tok, fmt, prompt, response)
        if not packing or start + n > 64:
            if start:
                w, start = w + 1, 0
        expected |= {(w, start + i) for i in range(n_prompt, n)}  # the response (and EOS / end of turn) only
        start += n
    assert response_positions(batch) == expected
    # and what is predicted there is exactly the response (+ EOS), never a prompt token
    for w_, t in expected:
        assert batch["targets"][w_, t - 1] == batch["input_ids"][w_, t]


def test_raw_format_is_bos_input_output_eos_with_only_output_and_eos_trained(train_mod, tok):
    ((ids, labels),) = train_mod.tokenize([RECORDS[0]], tok, "raw", 64, "truncate")[0]
    prompt = [tok.bos_token_id] + tok.encode(RECORDS[0][0], add_special_tokens=False)
    response = tok.encode(RECORDS[0][1], add_special_tokens=False) + [tok.eos_token_id]
    assert ids == prompt + response
    assert labels == [-100] * len(prompt) + response


def test_packing_restarts_positions_and_separates_documents(train_mod, tok):
    batch, docs, _ = windows(train_mod, tok, RECORDS, 96, True)
    lengths = [len(ids) for ids, _ in docs]
    assert batch["input_ids"].shape == (1, 96) and sum(lengths) <= 96
    seg, pos = batch["segment_ids"][0], batch["position_ids"][0]
    start = 0
    for k, n in enumerate(lengths, start=1):
        assert seg[start : start + n].eq(k).all() and pos[start : start + n].tolist() == list(range(n))
        assert batch["targets"][0, start + n - 1] == -100  # the last token of a document predicts nothing
        start += n
    assert seg[start:].eq(0).all() and batch["targets"][0, start:].eq(-100).all()
    mask = train_mod.document_mask(batch["segment_ids"])[0, 0]
    assert not mask[lengths[0], lengths[0] - 1]  # first token of document 2 cannot see document 1
    assert mask[lengths[0] + 1, lengths[0]]


def test_every_row_has_the_static_shape(train_mod, tok):
    for packing in (True, False):
        batch, _, _ = windows(train_mod, tok, RECORDS * 5, 48, packing)
        assert all(v.shape[1] == 48 for v in batch.values())


def test_document_losses_are_the_same_alone_and_packed(train_mod, tok, tokenizer_dir, tmp_path):
    model, _ = tiny_llama(train_mod, tmp_path, tokenizer_dir)

    def token_losses(records, doc_index):
        batch, docs, _ = windows(train_mod, tok, records, 96, True)
        with torch.no_grad():
            h = model(batch["input_ids"], batch["position_ids"], train_mod.document_mask(batch["segment_ids"]))
            losses = torch.nn.functional.cross_entropy(model.logits(h)[0], batch["targets"][0], reduction="none")
        start = sum(len(ids) for ids, _ in docs[:doc_index])
        n = len(docs[doc_index][0])
        keep = batch["targets"][0, start : start + n] != -100
        return losses[start : start + n][keep]

    alone = token_losses([RECORDS[2]], 0)
    packed = token_losses([RECORDS[0], RECORDS[1], RECORDS[2]], 2)
    assert len(alone) > 0 and torch.allclose(alone, packed, atol=1e-5)


def test_long_records_are_truncated_prompt_first_and_counted(train_mod, tok):
    long = ("word " * 80 + "\n", "STONE")
    docs, stats = train_mod.tokenize([long, RECORDS[0]], tok, "raw", 32, "truncate")
    assert stats["truncated"] == 1 and len(docs[0][0]) == 32
    response = tok.encode("STONE", add_special_tokens=False) + [tok.eos_token_id]
    assert docs[0][1][-len(response) :] == response  # the response survives intact


def test_long_records_can_be_dropped_and_counted(train_mod, tok):
    docs, stats = train_mod.tokenize([("word " * 80, "x"), RECORDS[0]], tok, "raw", 32, "drop")
    assert stats["dropped"] == 1 and len(docs) == 1


def test_dev_choose_samples_takes_the_head_of_the_file(train_mod, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"input": f"q{i}", "output": f"a{i}"}) + "\n" for i in range(10)))
    assert train_mod.read_records(path, "train", 3) == [("q0", "a0"), ("q1", "a1"), ("q2", "a2")]
    assert len(train_mod.read_records(path, "train", None)) == 10


def test_a_last_line_without_a_newline_is_read(train_mod, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"input": "q0", "output": "a0"}\n{"input": "q1", "output": "a1"}')
    assert train_mod.read_records(path, "train", None) == [("q0", "a0"), ("q1", "a1")]


def test_a_record_01_did_not_write_is_refused_with_the_01_command(train_mod, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"instruction": "q", "input": "", "output": "a"}) + "\n")
    with pytest.raises(
        train_mod.StageError,
        match=r"d.jsonl:1: fields \['input', 'instruction', 'output'\] are neither \{input, output\} nor "
        r"\{messages\}; 05 trains on .* python 01_download_data.py --config config.yaml "
        r"data.download.val_uri=\S+d.jsonl data.val_dir=\S+d.normalized.jsonl",
    ):
        train_mod.read_records(path, "val", None)


def test_data_order_is_a_pure_function_of_seed_and_step_and_covers_every_window(train_mod):
    first = [train_mod.step_indices(s, 10, 4, seed=7) for s in range(5)]
    assert first == [train_mod.step_indices(s, 10, 4, seed=7) for s in range(5)]
    flat = sum(first, [])
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))


def test_each_epoch_takes_its_own_seeded_permutation_of_the_windows(train_mod):
    n, per_step, seed = 12, 4, 7
    steps = [train_mod.step_indices(s, n, per_step, seed) for s in range(3 * n // per_step)]
    flat = sum(steps, [])
    epochs = [flat[e * n : (e + 1) * n] for e in range(3)]
    for e, order in enumerate(epochs):  # the documented order: randperm seeded by seed + epoch
        assert order == torch.randperm(n, generator=torch.Generator().manual_seed(seed + e)).tolist()
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2]


def test_inspect_data_marks_the_trained_tokens(train_mod, tok, capsys):
    batch, _, _ = windows(train_mod, tok, [RECORDS[1]], 48, True)
    train_mod.inspect_data(batch, tok, 1)
    out = capsys.readouterr().out
    assert "[[STONE</s>]]" in out and "[[Write" not in out
