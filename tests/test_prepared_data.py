"""Prepared data: each split is tokenized, masked and packed once per set of inputs, then memory-mapped by every
launch; the windows are exactly those of the plain one-record-at-a-time construction."""

import gzip
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import DEMO_DATA, ROOT, make_hf_model, write_overlay
from transformers import AutoTokenizer


# ------------------------------------------------------------------ the reference: one record at a time, in memory
def reference_windows(records, tok, fmt, seq_len, packing, truncation):
    """Each record tokenized alone, windows grouped as lists of documents, tensors filled document by document."""
    docs, stats = [], {"truncated": 0, "dropped": 0}
    for prompt, response in records:
        if fmt == "raw":
            p = [tok.bos_token_id] + tok.encode(prompt, add_special_tokens=False)
            r = tok.encode(response, add_special_tokens=False) + [tok.eos_token_id]
        else:
            user = [{"role": "user", "content": prompt}]
            p = list(tok.apply_chat_template(user, add_generation_prompt=True, tokenize=True)["input_ids"])
            full = list(
                tok.apply_chat_template(user + [{"role": "assistant", "content": response}], tokenize=True)["input_ids"]
            )
            assert full[: len(p)] == p
            r = full[len(p) :]
        if len(p) + len(r) > seq_len:
            if truncation == "drop":
                stats["dropped"] += 1
                continue
            stats["truncated"] += 1
            p = p[: max(1, seq_len - len(r))]
            r = r[: seq_len - len(p)]
        docs.append((p + r, [-100] * len(p) + r))
    windows, current, used = [], [], 0
    for doc in docs:
        if not packing or (current and used + len(doc[0]) > seq_len):
            if current:
                windows.append(current)
            current, used = [], 0
        current.append(doc)
        used += len(doc[0])
    windows.append(current)
    n = len(windows)
    batch = {
        "input_ids": torch.full((n, seq_len), tok.pad_token_id),
        "targets": torch.full((n, seq_len), -100),
        "position_ids": torch.zeros((n, seq_len), dtype=torch.long),
        "segment_ids": torch.zeros((n, seq_len), dtype=torch.long),
    }
    for w, window in enumerate(windows):
        start = 0
        for seg, (ids, labels) in enumerate(window, start=1):
            end = start + len(ids)
            batch["input_ids"][w, start:end] = torch.tensor(ids)
            batch["targets"][w, start : end - 1] = torch.tensor(labels[1:])
            batch["position_ids"][w, start:end] = torch.arange(len(ids))
            batch["segment_ids"][w, start:end] = seg
            start = end
        batch["position_ids"][w, start:] = torch.arange(seq_len - start)
    return batch, stats


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


@pytest.fixture(scope="module")
def model_config(tmp_path_factory, tokenizer_dir):
    out = tmp_path_factory.mktemp("hf")
    make_hf_model(out, tokenizer_dir)
    return out / "config.json"


def settings(train_mod, tokenizer_dir, model_config, data, *overrides):
    """The resolved config of a stage-05 launch on `data` (train and val), prepared under data's directory."""
    values = {
        "data.train_dir": str(data),
        "data.val_dir": str(data),
        "data.tokenizer.type": str(tokenizer_dir),
        "model.model_config": str(model_config),
        "data.dev_choose_samples": None,
        "data.seq_length": 64,
        "distributed_strategy.tensor_model_parallel_size": 1,
        "distributed_strategy.kv_replicator": 1,
        "trainer.accelerator": "cpu",
    }
    overlay = write_overlay(data.parent / "overlay.yaml", values)
    cfg = train_mod.load_config([ROOT / "config.yaml", overlay], list(overrides))
    return train_mod.resolve(cfg, train_mod.SCHEMA), overlay


def copy_demo(tmp_path, n=None):
    lines = (DEMO_DATA / "train.jsonl").read_text().splitlines(keepends=True)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(lines if n is None else (lines * (n // len(lines) + 1))[:n]))
    return data


def files_of(where):
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in where.iterdir()}


# ------------------------------------------------------------------ what the windows are
@pytest.mark.parametrize(
    "fmt,seq_len,packing,truncation",
    [
        ("raw", 64, True, "truncate"),
        ("raw", 64, False, "truncate"),
        ("chat_template", 96, True, "truncate"),
        ("raw", 20, True, "truncate"),
        ("raw", 20, False, "drop"),
    ],
    ids=["raw-packed", "raw-padded", "chat-packed", "truncated", "dropped"],
)
def test_prepared_windows_equal_the_one_record_at_a_time_reference_on_the_demo_data(
    train_mod, tok, tokenizer_dir, model_config, tmp_path, fmt, seq_len, packing, truncation
):
    data = copy_demo(tmp_path)
    c, _ = settings(
        train_mod,
        tokenizer_dir,
        model_config,
        data,
        f"data.prompt_format={fmt}",
        f"data.seq_length={seq_len}",
        f"model_alignment_strategy.sft.packing={packing}",
        f"data.truncation={truncation}",
    )
    windows = train_mod.load_split(data, tok, c, "train", None)
    expected, stats = reference_windows(
        train_mod.read_records(data, "train", None), tok, fmt, seq_len, packing, truncation
    )
    got = windows.batch(range(len(windows)))
    assert got.keys() == expected.keys()
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
    assert windows.supervised.tolist() == (expected["targets"] != -100).sum(1).tolist()
    assert windows.n_tokens.tolist() == (expected["segment_ids"] > 0).sum(1).tolist()
    summary = json.loads(next(data.parent.glob("train.jsonl.prepared/*/prepared.json")).read_text())["stats"]
    assert (summary["truncated"], summary["dropped"]) == (stats["truncated"], stats["dropped"])
    assert (fmt, truncation) != ("raw", "truncate") or seq_len > 20 or stats["truncated"] > 0  # the case is real


def test_token_arrays_are_memory_mapped_not_loaded(train_mod, tok, tokenizer_dir, model_config, tmp_path):
    data = copy_demo(tmp_path)
    c, _ = settings(train_mod, tokenizer_dir, model_config, data)
    windows = train_mod.load_split(data, tok, c, "train", None)
    assert isinstance(windows.tokens, __import__("numpy").memmap) and windows.tokens.dtype.name == "int32"
    assert isinstance(windows.trained, __import__("numpy").memmap)


# ------------------------------------------------------------------ prepared once, reused, rebuilt on change
def test_a_second_launch_maps_the_prepared_files_without_preparing_again(
    train_mod, tok, tokenizer_dir, model_config, tmp_path, capsys
):
    data = copy_demo(tmp_path)
    c, _ = settings(train_mod, tokenizer_dir, model_config, data)
    train_mod.load_split(data, tok, c, "train", None)
    assert "preparing" in capsys.readouterr().err
    (where,) = (data.parent / "train.jsonl.prepared").iterdir()
    before = files_of(where)
    again = train_mod.load_split(data, tok, c, "train", None)
    assert "preparing" not in capsys.readouterr().err
    assert files_of(where) == before and len(again) > 0


@pytest.mark.parametrize(
    "change",
    [
        "data.seq_length=48",
        "model_alignment_strategy.sft.packing=false",
        "data.truncation=drop",
        "data.prompt_format=chat_template",
        "data.dev_choose_samples=100",
        "data file content",
        "tokenizer file",
    ],
)
def test_each_input_of_the_windows_prepares_them_anew(train_mod, tok, tokenizer_dir, model_config, tmp_path, change):
    import shutil

    data = copy_demo(tmp_path)
    tokdir = tmp_path / "tokenizer"
    shutil.copytree(tokenizer_dir, tokdir)
    c, _ = settings(train_mod, tokdir, model_config, data)
    first, _ = train_mod.prepared_location(data, tokdir, c)
    overrides = [change] if "=" in change else []
    if change == "data file content":
        data.write_text(data.read_text().replace("What is 9 + 2?", "What is 9 + 3?", 1))
    if change == "tokenizer file":
        config = tokdir / "tokenizer_config.json"
        config.write_text(config.read_text().replace("{", '{"model_max_length": 77, ', 1))
    c2, _ = settings(train_mod, tokdir, model_config, data, *overrides)
    second, _ = train_mod.prepared_location(data, tokdir, c2)
    assert first != second and first.parent == second.parent
    unchanged, _ = train_mod.prepared_location(
        data, tokdir, settings(train_mod, tokdir, model_config, data, *overrides)[0]
    )
    assert unchanged == second


def test_data_cache_dir_moves_the_prepared_files(train_mod, tok, tokenizer_dir, model_config, tmp_path):
    data = copy_demo(tmp_path)
    c, _ = settings(train_mod, tokenizer_dir, model_config, data, f"data.cache_dir={tmp_path / 'elsewhere'}")
    train_mod.load_split(data, tok, c, "train", None)
    assert list((tmp_path / "elsewhere" / "train.jsonl.prepared").glob("*/prepared.json"))
    assert not (data.parent / "train.jsonl.prepared").exists()


def test_a_killed_preparation_is_never_used_and_its_leftovers_are_removed(
    train_mod, tok, tokenizer_dir, model_config, tmp_path
):
    data = copy_demo(tmp_path, n=60_000)
    c, overlay = settings(train_mod, tokenizer_dir, model_config, data)
    proc = subprocess.Popen(
        [sys.executable, "05_train.py", "--config", "config.yaml", "--config", str(overlay), "--inspect-data", "1"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    root = data.parent / "train.jsonl.prepared"
    try:
        deadline = time.monotonic() + 120
        while not any(p.stat().st_size for p in root.glob("*.tmp-*/tokens.bin")):
            assert proc.poll() is None and time.monotonic() < deadline, "the preparation ended before it was killed"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    (leftover,) = root.glob("*.tmp-*")
    assert not list(root.glob("*/prepared.json"))  # nothing that a launch could take for finished
    windows = train_mod.load_split(data, tok, c, "train", None)
    (where,) = root.iterdir()
    assert not leftover.exists() and where.name == leftover.name.split(".tmp-")[0]
    stats = json.loads((where / "prepared.json").read_text())["stats"]
    assert stats["records"] == 60_000 and len(windows) == stats["windows"]
    assert (where / "tokens.bin").stat().st_size == 4 * int(windows.doc_starts[-1]) == 4 * stats["tokens"]


def test_a_leftover_of_a_killed_preparation_holding_anything_else_is_left_as_it_is(
    train_mod, tok, tokenizer_dir, model_config, tmp_path
):
    data = copy_demo(tmp_path, n=50)
    c, _ = settings(train_mod, tokenizer_dir, model_config, data)
    where = train_mod.prepared_location(data, tokenizer_dir, c)[0]
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    leftover = where.with_name(f"{where.name}.tmp-{os.uname().nodename}-{gone.stdout.strip()}")
    leftover.mkdir(parents=True)
    (leftover / "tokens.bin").write_bytes(b"")
    (leftover / "mine.txt").write_text("mine")
    train_mod.load_split(data, tok, c, "train", None)
    assert (leftover / "mine.txt").read_text() == "mine" and (where / "prepared.json").exists()


def test_a_read_only_data_directory_asks_for_data_cache_dir(train_mod, tok, tokenizer_dir, model_config, tmp_path):
    data = copy_demo(tmp_path)
    c, _ = settings(train_mod, tokenizer_dir, model_config, data, f"data.cache_dir={tmp_path / 'a-file'}")
    (tmp_path / "a-file").write_text("not a directory")
    with pytest.raises(train_mod.StageError, match="cannot write the prepared data to .*set data.cache_dir"):
        train_mod.load_split(data, tok, c, "train", None)


def test_a_missing_data_file_is_named(train_mod, tok, tokenizer_dir, model_config, tmp_path):
    c, _ = settings(train_mod, tokenizer_dir, model_config, tmp_path / "train.jsonl")
    with pytest.raises(train_mod.StageError, match="train.jsonl not found"):
        train_mod.load_split(tmp_path / "train.jsonl", tok, c, "train", None)


# ------------------------------------------------------------------ records
def test_an_invalid_json_line_is_named_with_its_line_number(train_mod, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"input": "a", "output": "b"}\n\n{"input": "c", "output": \n')
    with pytest.raises(train_mod.StageError, match=r"d.jsonl:3: not valid JSON"):
        train_mod.read_records(data, "train", None)


@pytest.mark.parametrize(
    "name,content,kind",
    [
        ("d.json", b'[{"input": "q0", "output": "a0"}]', "a JSON array"),
        ("d.jsonl.gz", gzip.compress(b'{"input": "q0", "output": "a0"}\n', mtime=0), "gzip-compressed"),
        ("d.parquet", b"PAR1", "parquet"),
        ("d.arrow", b"\xff\xff\xff\xff", "arrow"),
        ("d", None, "a directory"),
    ],
    ids=["json-array", "gzip", "parquet", "arrow", "directory"],
)
def test_05_refuses_a_file_01_did_not_write_before_any_work(
    train_mod, tok, tokenizer_dir, model_config, tmp_path, name, content, kind
):
    data = tmp_path / name
    data.mkdir() if content is None else data.write_bytes(content)
    c, _ = settings(train_mod, tokenizer_dir, model_config, data)
    with pytest.raises(train_mod.StageError, match=rf"{name}: {kind}, not JSON lines; .* 01_download_data.py"):
        train_mod.load_split(data, tok, c, "train", None)
    assert not list(tmp_path.glob("*.prepared"))
