"""Each stage replaces its own earlier outputs and nothing else, and a failed stage leaves nothing behind."""

import json

import pytest
from conftest import DEMO_DATA, ROOT, load_stage, make_hf_model, run_stage, write_overlay


def stage(name, overlay, *args, check=True):
    return run_stage([name, "--config", "config.yaml", "--config", str(overlay), *args], check=check)


def model_downloaded(tmp_path, tokenizer_dir):
    """02 run once from a tiny local model into weights w/, tokenizer t/ and config c.json; returns its overlay."""
    make_hf_model(tmp_path / "src", tokenizer_dir)
    overlay = write_overlay(
        tmp_path / "o.yaml",
        {
            "model.download.source": str(tmp_path / "src"),
            "model.hf_weights_dir": str(tmp_path / "w"),
            "data.tokenizer.type": str(tmp_path / "t"),
            "model.model_config": str(tmp_path / "c.json"),
        },
    )
    stage("02_download_model.py", overlay)
    return overlay


def test_02_writes_tokenizer_and_weights_into_one_directory_as_on_the_hub(tmp_path, tokenizer_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    make_hf_model(tmp_path / "src", tokenizer_dir)
    model_dir = tmp_path / "models" / "tiny"
    overlay = write_overlay(
        tmp_path / "o.yaml",
        {
            "model.download.source": str(tmp_path / "src"),
            "model.hf_weights_dir": str(model_dir),
            "data.tokenizer.type": str(model_dir),
            "model.model_config": str(model_dir / "config.json"),
        },
    )
    for _ in range(2):  # the second run replaces the first one's output
        stage("02_download_model.py", overlay)
        assert AutoTokenizer.from_pretrained(str(model_dir)).eos_token == "</s>"
        assert AutoModelForCausalLM.from_pretrained(str(model_dir)).config.num_hidden_layers == 2
        assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["tiny"]  # no .old, no .tmp


def test_02_replaces_only_what_it_wrote_and_refuses_when_a_file_of_yours_would_go(tmp_path, tokenizer_dir):
    """A note and a folder of yours in 02's own weights directory: the re-run (make demo's, say) is refused naming
    them, and they and the output stay as they were; once they are moved out, the re-run replaces the output."""
    overlay = model_downloaded(tmp_path, tokenizer_dir)
    assert "files_written:" in (tmp_path / "w" / "resolved_config.yaml").read_text()
    (tmp_path / "w" / "NOTES.md").write_text("what I found\n")
    (tmp_path / "w" / "my_eval").mkdir()
    before = sorted(p.name for p in (tmp_path / "w").iterdir())
    proc = stage("02_download_model.py", overlay, check=False)
    assert proc.returncode == 1 and "holds NOTES.md, my_eval/ beside what 02 wrote there" in proc.stderr
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == before
    (tmp_path / "w" / "NOTES.md").unlink()
    (tmp_path / "w" / "my_eval").rmdir()
    stage("02_download_model.py", overlay)


def test_02_refuses_to_replace_an_edited_model_config(tmp_path, tokenizer_dir):
    overlay = model_downloaded(tmp_path, tokenizer_dir)
    edited = json.loads((tmp_path / "c.json").read_text()) | {"my_note": "edited by hand"}
    (tmp_path / "c.json").write_text(json.dumps(edited))
    proc = stage("02_download_model.py", overlay, check=False)
    assert proc.returncode == 1 and "model.model_config" in proc.stderr
    assert json.loads((tmp_path / "c.json").read_text())["my_note"] == "edited by hand"


def test_01_replaces_its_earlier_output_when_the_source_changes(tmp_path):
    source = tmp_path / "source.jsonl"
    lines = (DEMO_DATA / "val.jsonl").read_text().splitlines(keepends=True)
    source.write_text("".join(lines[:5]))
    overlay = write_overlay(
        tmp_path / "o.yaml",
        {
            "data.download.train_uri": str(source),
            "data.download.val_uri": None,
            "data.train_dir": str(tmp_path / "out" / "train.jsonl"),
            "data.tokenizer.type": str(tmp_path / "none"),
        },
    )
    stage("01_download_data.py", overlay)
    source.write_text("".join(lines[:7]))
    assert "7 records" in stage("01_download_data.py", overlay).stdout
    manifest = json.loads((tmp_path / "out" / "train.jsonl.manifest.json").read_text())
    assert manifest["records"] == 7 and manifest["written_by"] == "01_download_data.py"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["train.jsonl", "train.jsonl.manifest.json"]


def test_01_replaces_an_output_edited_since_it_wrote_it_only_with_overwrite(tmp_path):
    overlay = write_overlay(
        tmp_path / "o.yaml",
        {
            "data.download.train_uri": str(DEMO_DATA / "val.jsonl"),
            "data.download.val_uri": None,
            "data.train_dir": str(tmp_path / "train.jsonl"),
            "data.tokenizer.type": str(tmp_path / "none"),
        },
    )
    stage("01_download_data.py", overlay)
    edited = (tmp_path / "train.jsonl").read_text() + '{"input": "mine", "output": "kept"}\n'
    (tmp_path / "train.jsonl").write_text(edited)
    proc = stage("01_download_data.py", overlay, check=False)
    assert proc.returncode == 1 and "was changed since 01 wrote it" in proc.stderr and "--overwrite" in proc.stderr
    assert (tmp_path / "train.jsonl").read_text() == edited
    assert "200 records" in stage("01_download_data.py", overlay, "--overwrite").stdout
    assert (tmp_path / "train.jsonl").read_text() != edited


def test_01_into_a_new_directory_tree_creates_it_only_when_it_succeeds(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input": "a"}\n')
    overlay = write_overlay(
        tmp_path / "o.yaml",
        {
            "data.download.train_uri": str(bad),
            "data.download.val_uri": None,
            "data.train_dir": str(tmp_path / "a" / "b" / "train.jsonl"),
        },
    )
    proc = stage("01_download_data.py", overlay, check=False)
    assert proc.returncode == 1 and f"{bad}:1: missing field 'output'" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "o.yaml"]


def test_01_never_downloads_into_a_directory_it_did_not_make(tmp_path):
    """Partial downloads live in .<output name>.download/, which 01 marks as its own; a directory of that name
    that is not 01's is refused before anything is fetched (the address below is never contacted)."""
    theirs = tmp_path / ".train.jsonl.download"
    theirs.mkdir()
    (theirs / "data.jsonl").write_text("mine\n")
    overlay = write_overlay(
        tmp_path / "o.yaml",
        {
            "data.download.train_uri": "https://127.0.0.1:9/data.jsonl",
            "data.download.val_uri": None,
            "data.train_dir": str(tmp_path / "train.jsonl"),
        },
    )
    proc = stage("01_download_data.py", overlay, check=False)
    assert proc.returncode == 1 and f"{theirs} exists and was not written by 01_download_data.py" in proc.stderr
    assert [p.name for p in theirs.iterdir()] == ["data.jsonl"] and (theirs / "data.jsonl").read_text() == "mine\n"


def test_03_to_hf_replaces_its_own_export_with_overwrite_only(pipeline):
    work, overlay = pipeline
    stage("03_convert_checkpoint.py", overlay, "--to-hf", str(work / "export"))
    proc = stage("03_convert_checkpoint.py", overlay, "--to-hf", str(work / "export"), check=False)
    assert proc.returncode == 1 and "holds an earlier output of this stage; pass --overwrite" in proc.stderr
    stage("03_convert_checkpoint.py", overlay, "--to-hf", str(work / "export"), "--overwrite")
    assert not (work / "export.old").exists() and not (work / "export.tmp").exists()
    (work / "export" / "MODEL_CARD.md").write_text("# my merged model\n")
    proc = stage("03_convert_checkpoint.py", overlay, "--to-hf", str(work / "export"), "--overwrite", check=False)
    assert proc.returncode == 1 and "holds MODEL_CARD.md beside what 03 wrote there" in proc.stderr
    assert (work / "export" / "MODEL_CARD.md").read_text() == "# my merged model\n"


def test_03_overwrite_keeps_a_file_of_yours_in_the_converted_checkpoint_by_refusing(pipeline):
    work, overlay = pipeline
    (work / "ckpt" / "model" / "notes.txt").write_text("converted for TP 1\n")
    try:
        proc = stage("03_convert_checkpoint.py", overlay, "--overwrite", check=False)
        assert (
            proc.returncode == 1 and f"{work / 'ckpt'} holds model/notes.txt beside what 03 wrote there" in proc.stderr
        )
        assert (work / "ckpt" / "model" / "notes.txt").exists()
    finally:
        (work / "ckpt" / "model" / "notes.txt").unlink()


def test_05_trains_into_an_empty_directory_the_user_made(pipeline):
    work, overlay = pipeline
    (work / "empty").mkdir()
    stage(
        "05_train.py",
        overlay,
        f"exp_manager.explicit_log_dir={work / 'empty'}",
        "trainer.max_steps=1",
        "evaluation.generate.num_prompts=0",
    )
    assert (work / "empty" / "final" / "adapter" / "adapter_config.json").exists()
    assert (work / "empty" / "config.yaml").read_text().startswith("# written by 05_train.py")


def test_05_a_run_that_fails_before_its_first_step_leaves_no_directory(pipeline, monkeypatch):
    work, overlay = pipeline
    train = load_stage("05_train.py")

    def broken_evaluation(*args, **kwargs):
        raise RuntimeError("the device went away")

    monkeypatch.setattr(train, "run_evaluation", broken_evaluation)
    run_dir = work / "failed" / "deeper" / "run"
    with pytest.raises(RuntimeError, match="the device went away"):
        train.main(["--config", "config.yaml", "--config", str(overlay), f"exp_manager.explicit_log_dir={run_dir}"])
    assert not (work / "failed").exists()


def test_05_a_failed_start_removes_only_the_files_it_wrote_and_keeps_one_put_there(pipeline, monkeypatch):
    work, overlay = pipeline
    train = load_stage("05_train.py")
    run_dir = work / "failed-kept" / "run"

    def broken_evaluation(*args, **kwargs):
        (run_dir / "NOTES.md").write_text("mine")  # put there while the launch starts
        raise RuntimeError("the device went away")

    monkeypatch.setattr(train, "run_evaluation", broken_evaluation)
    with pytest.raises(RuntimeError, match="the device went away"):
        train.main(["--config", "config.yaml", "--config", str(overlay), f"exp_manager.explicit_log_dir={run_dir}"])
    assert [p.name for p in run_dir.iterdir()] == ["NOTES.md"] and (run_dir / "NOTES.md").read_text() == "mine"


def test_05_a_failed_data_preparation_leaves_no_directory(pipeline, tmp_path):
    work, overlay = pipeline
    data = tmp_path / "cache" / "train.jsonl"
    data.parent.mkdir()
    data.write_text((DEMO_DATA / "train.jsonl").read_text().splitlines()[0] + "\n{broken\n")
    proc = stage(
        "05_train.py",
        overlay,
        f"data.train_dir={data}",
        f"exp_manager.explicit_log_dir={tmp_path / 'run'}",
        f"data.cache_dir={tmp_path / 'made' / 'for' / 'it'}",
        check=False,
    )
    assert proc.returncode == 1 and f"{data}:2: not valid JSON" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]
    assert [p.name for p in data.parent.iterdir()] == ["train.jsonl"]


def test_no_make_target_but_clean_deletes_anything_and_clean_says_what_it_deletes():
    """make demo used to `rm -rf runs/demo`, a run trained there with demo.yaml included; now 05 resumes or refuses."""
    import re

    recipes = re.findall(r"^([\w-]+):[^\n]*\n((?:\t[^\n]*\n)+)", (ROOT / "Makefile").read_text(), re.M)
    deleting = {target for target, body in recipes if re.search(r"\brm\b", body)}
    assert deleting == {"clean"}
    clean = dict(recipes)["clean"]
    assert clean.index("@echo") < clean.index("rm -rf") and "runs/demo" in clean.split("rm -rf")[0]
