"""Stage 01: sources, record validation with file:line reports, dolly conversion, manifest, atomic output."""

import http.server
import json
import threading
from functools import partial

import pytest
from conftest import ROOT, run_stage, write_overlay


def settings(tmp_path, train_uri, **extra):
    values = {
        "data.download.train_uri": str(train_uri),
        "data.download.val_uri": None,
        "data.train_dir": str(tmp_path / "out" / "train.jsonl"),
        "data.val_dir": None,
    }
    values.update(extra)
    return ["--config", "config.yaml", "--config", str(write_overlay(tmp_path / "o.yaml", values))]


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_a_bad_line_stops_the_stage_with_file_and_line_and_leaves_no_output(tmp_path):
    src = write_lines(
        tmp_path / "in.jsonl", [json.dumps({"input": "a", "output": "b"}), "", json.dumps({"input": "a", "output": 3})]
    )
    proc = run_stage(["01_download_data.py", *settings(tmp_path, src)], check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith(f"error: {src}:3: field 'output' must be a string, got int")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize(
    "line,reason",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object, got list"),
        (json.dumps({"input": "a"}), "missing field 'output'"),
    ],
)
def test_each_kind_of_bad_line_is_explained(tmp_path, line, reason):
    src = write_lines(tmp_path / "in.jsonl", [line])
    proc = run_stage(["01_download_data.py", *settings(tmp_path, src)], check=False)
    assert proc.returncode == 1 and f"{src}:1: {reason}" in proc.stderr


def test_skip_policy_counts_bad_lines_in_the_manifest(tmp_path):
    good = json.dumps({"input": "a", "output": "b", "category": "qa"})
    src = write_lines(tmp_path / "in.jsonl", [good, "{oops", good])
    run_stage(["01_download_data.py", *settings(tmp_path, src, **{"data.download.bad_lines": "skip"})])
    out = tmp_path / "out" / "train.jsonl"
    assert [json.loads(x) for x in out.read_text().splitlines()] == [json.loads(good)] * 2
    manifest = json.loads((tmp_path / "out" / "train.jsonl.manifest.json").read_text())
    assert manifest["records"] == 2 and manifest["duplicates"] == 1
    assert [(r["source"], r["line"]) for r in manifest["rejected_lines"]] == [(str(src), 2)]
    assert manifest["rejected_lines"][0]["reason"].startswith("not valid JSON")


def test_dolly_records_are_converted_the_nemo_way(tmp_path):
    src = write_lines(
        tmp_path / "in.jsonl",
        [
            json.dumps({"instruction": "Summarize.", "context": "Long text.", "response": "Short.", "category": "s"}),
            json.dumps({"instruction": "Name a color.", "context": "", "response": "Red."}),
        ],
    )
    run_stage(["01_download_data.py", *settings(tmp_path, src)])
    out = [json.loads(x) for x in (tmp_path / "out" / "train.jsonl").read_text().splitlines()]
    assert out[0] == {"input": "Summarize.\n\nLong text.", "output": "Short.", "category": "s"}
    assert out[1] == {"input": "Name a color.", "output": "Red."}


def test_a_missing_local_source_is_named(tmp_path):
    proc = run_stage(["01_download_data.py", *settings(tmp_path, tmp_path / "nope.jsonl")], check=False)
    assert proc.returncode == 1 and "nope.jsonl: local file not found" in proc.stderr


@pytest.fixture
def http_server(tmp_path):
    """A real HTTP server on 127.0.0.1 serving tmp_path/www."""
    (tmp_path / "www").mkdir()
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "www"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", tmp_path / "www"
    server.shutdown()


def test_https_source_downloads_through_a_real_server(tmp_path, http_server):
    url, www = http_server
    (www / "sft").mkdir(parents=True)
    data = (ROOT / "demo" / "data" / "val.jsonl").read_bytes()
    (www / "sft" / "val.jsonl").write_bytes(data)
    run_stage(["01_download_data.py", *settings(tmp_path, f"{url}/sft/val.jsonl")])
    assert (tmp_path / "out" / "train.jsonl").read_bytes() == data


def test_a_404_names_the_uri(tmp_path, http_server):
    url, _ = http_server
    proc = run_stage(["01_download_data.py", *settings(tmp_path, f"{url}/missing.jsonl")], check=False)
    assert proc.returncode == 1 and f"{url}/missing.jsonl: HTTP 404" in proc.stderr


def test_demo_data_matches_its_generator():
    import subprocess
    import sys

    subprocess.run([sys.executable, str(ROOT / "demo" / "make_demo_data.py"), "--check"], check=True)


def test_manifest_has_token_length_statistics_when_the_tokenizer_exists(tmp_path, tokenizer_dir):
    src = write_lines(
        tmp_path / "in.jsonl",
        [
            json.dumps({"input": "What is 4 + 2?\n", "output": "6"}),
            json.dumps({"input": "Convert 7 km to meters.\n", "output": "7000 m"}),
        ],
    )
    run_stage(["01_download_data.py", *settings(tmp_path, src, **{"data.tokenizer.type": str(tokenizer_dir)})])
    stats = json.loads((tmp_path / "out" / "train.jsonl.manifest.json").read_text())["token_lengths"]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    lengths = sorted(
        len(tok.encode(t, add_special_tokens=False)) for t in ("What is 4 + 2?\n6", "Convert 7 km to meters.\n7000 m")
    )
    assert (stats["min"], stats["max"], stats["mean"]) == (lengths[0], lengths[1], sum(lengths) / 2)


@pytest.mark.parametrize("name", ["in.jsonl", "in.jsonl.gz"])
def test_a_last_line_without_a_newline_is_a_record(tmp_path, name):
    import gzip

    text = json.dumps({"input": "a", "output": "b"}) + "\n" + json.dumps({"input": "c", "output": "d"})
    src = tmp_path / name
    src.write_bytes(gzip.compress(text.encode()) if name.endswith(".gz") else text.encode())
    run_stage(["01_download_data.py", *settings(tmp_path, src)])
    out = (tmp_path / "out" / "train.jsonl").read_text().splitlines()
    assert [json.loads(line)["input"] for line in out] == ["a", "c"]


@pytest.mark.parametrize(
    "change,effect",
    [
        ("data.rename_fields=[instruction=note]", "rewritten"),
        ("data.format=dolly", "its fields do not fit the dolly format"),
    ],
)
def test_a_rerun_with_other_reading_settings_reads_the_source_again(tmp_path, change, effect):
    """data.format and data.rename_fields decide what 01 writes from a source: a re-run that changes either is not
    'up to date'."""
    src = write_lines(tmp_path / "in.jsonl", [json.dumps({"instruction": "I", "input": "x", "output": "y"})])
    run_stage(["01_download_data.py", *settings(tmp_path, src)])
    out = tmp_path / "out" / "train.jsonl"
    assert json.loads(out.read_text()) == {"input": "I\n\nx", "output": "y"}
    proc = run_stage(["01_download_data.py", *settings(tmp_path, src), change], check=False)
    assert "nothing to do" not in proc.stdout
    if effect == "rewritten":
        assert proc.returncode == 0 and json.loads(out.read_text()) == {"input": "x", "output": "y", "note": "I"}
    else:
        assert proc.returncode == 1 and effect in proc.stderr
