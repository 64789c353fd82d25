"""Shared test fixtures: stage modules loaded by path, a tiny tokenizer and tiny random Llama models on disk."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEMO_DATA = ROOT / "demo" / "data"


def load_stage(filename):
    """Import a stage file (their names start with a digit, so plain `import` cannot)."""
    spec = importlib.util.spec_from_file_location(filename.replace(".py", "").replace("0", "s0", 1), ROOT / filename)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def train_mod():
    return load_stage("05_train.py")


def run_stage(args, cwd=ROOT, env=None, check=True):
    """Run a stage as a user would; returns the CompletedProcess (stdout and stderr captured)."""
    cmd = args if args[0] == "bash" else [sys.executable, *args]
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args[0]} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def demo_texts():
    for name in ("train.jsonl", "val.jsonl"):
        for line in (DEMO_DATA / name).read_text().splitlines():
            r = json.loads(line)
            yield r["input"] + r["output"]


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    """A byte-level BPE tokenizer (vocab 384) trained on the demo texts, with BOS/EOS/pad and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(demo_texts(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = (
        "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
    )
    out = tmp_path_factory.mktemp("tokenizer")
    fast.save_pretrained(str(out))
    return out


TINY = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
# With head_dim 16 and theta 500000 the wavelengths are 6.3, 32.4, 167, ... tokens: one above
# original_max / low_freq_factor (64: scaled by 1/factor), one below original_max / high_freq_factor (16: kept)
# and one between them (smoothed), so every branch of the Llama-3.1 rule is exercised.


def make_hf_model(out_dir, tokenizer_dir, seed=0, family="llama", **overrides):
    """Save a random tiny LlamaForCausalLM (or, with family="mistral", MistralForCausalLM; norm weights randomized
    too) with the tiny tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    config_class, model_class = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "mistral": (MistralConfig, MistralForCausalLM),
    }[family]
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    kwargs = dict(
        TINY,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = model_class(config_class(**kwargs)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    return model


def write_overlay(path, values):
    """A config overlay file from a flat {dotted.key: value} dict."""
    nested = {}
    for key, value in values.items():
        *parents, leaf = key.split(".")
        node = nested
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    Path(path).write_text(yaml.safe_dump(nested))
    return path


def tiny_settings(work):
    """Overlay values that point every stage at files under `work` with tiny-model sizes."""
    work = Path(work)
    return {
        "trainer.accelerator": "cpu",
        "trainer.max_steps": 3,
        "trainer.log_every_n_steps": 1,
        "trainer.val_check_interval": 2,
        "exp_manager.explicit_log_dir": str(work / "run"),
        "exp_manager.resume_from_checkpoint": str(work / "ckpt"),
        "distributed_strategy.tensor_model_parallel_size": 1,
        "distributed_strategy.kv_replicator": 1,
        "data.download.train_uri": str(DEMO_DATA / "train.jsonl"),
        "data.download.val_uri": str(DEMO_DATA / "val.jsonl"),
        "data.train_dir": str(work / "data" / "training.jsonl"),
        "data.val_dir": str(work / "data" / "validation.jsonl"),
        "data.dev_choose_samples": 24,
        "data.seq_length": 64,
        "data.global_batch_size": 2,
        "data.tokenizer.type": str(work / "tokenizer"),
        "model.download.source": str(work / "hf_source"),
        "model.model_config": str(work / "config.json"),
        "model.hf_weights_dir": str(work / "hf_weights"),
        "model.optim.lr": 1e-2,
        "model.optim.sched.warmup_steps": 1,
        "precision.type": "fp32",
        "model_alignment_strategy.peft.target_modules": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
        "evaluation.generate.num_prompts": 4,
        "evaluation.generate.max_new_tokens": 6,
        "evaluation.generate.batch_size": 4,
        "evaluation.generate.show": 1,
    }


def tiny_llama(train, work, tokenizer_dir, **overrides):
    """(our Llama, HF model) with the same random weights, converted in-process by stage 03's mapping."""
    convert = load_stage("03_convert_checkpoint.py")
    hf = make_hf_model(work, tokenizer_dir, **overrides)
    config = json.loads((Path(work) / "config.json").read_text())
    arch = convert.arch_of(config)
    reader = convert.TensorReader(convert.weight_files(Path(work)))
    state = convert.nxdt_shard(convert.Layout(arch), convert.pipeline_stages(arch, 1), reader, 0, 0, False)
    model = train.Llama(train.read_model_config(Path(work) / "config.json"))
    with torch.no_grad():
        for name, dest in train.base_weight_slots(model, fuse_qkv=False).items():
            dest.copy_(state[name])
    return model.eval(), hf


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, tokenizer_dir):
    """Stages 01-03 on a tiny random model; returns (work dir, overlay path)."""
    work = tmp_path_factory.mktemp("train")
    make_hf_model(work / "hf_source", tokenizer_dir)
    overlay = write_overlay(work / "overlay.yaml", tiny_settings(work))
    for stage in ("01_download_data.py", "02_download_model.py", "03_convert_checkpoint.py"):
        run_stage([stage, "--config", "config.yaml", "--config", str(overlay)])
    return work, overlay


def train(work, overlay, name, *overrides):
    """Run 05 in-process with its own run directory; returns the metrics.jsonl records."""
    run_dir = work / name
    load_stage("05_train.py").main(
        ["--config", "config.yaml", "--config", str(overlay), f"exp_manager.explicit_log_dir={run_dir}", *overrides]
    )
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def pytest_configure(config):
    config.addinivalue_line("markers", "xla: needs torch-xla (run by `make test-xla` in its own environment)")


def hf_masked_loss(work, records, fmt="raw", adapter=None):
    """Sum of supervised-token cross-entropies / their count, computed with transformers on each record (through
    peft with `adapter`, a PEFT adapter directory, loaded with warnings as errors)."""
    import warnings

    import torch.nn.functional as F
    from transformers import AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(work / "tokenizer"))
    model = LlamaForCausalLM.from_pretrained(str(work / "hf_weights")).eval()
    if adapter is not None:
        from peft import PeftModel

        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a mis-named tensor would only warn and load a no-op adapter
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            model = PeftModel.from_pretrained(model, str(adapter)).eval()
    total, count = 0.0, 0
    for r in records:
        if fmt == "raw":
            prompt = [tok.bos_token_id] + tok.encode(r["input"], add_special_tokens=False)
            response = tok.encode(r["output"], add_special_tokens=False) + [tok.eos_token_id]
        else:
            user = [{"role": "user", "content": r["input"]}]
            prompt = tok.apply_chat_template(user, add_generation_prompt=True, tokenize=True, return_dict=False)
            full = tok.apply_chat_template(
                user + [{"role": "assistant", "content": r["output"]}], tokenize=True, return_dict=False
            )
            response = full[len(prompt) :]
        ids = torch.tensor([prompt + response])
        labels = torch.tensor([[-100] * len(prompt) + response])
        with torch.no_grad():
            logits = model(ids).logits[0, :-1]
        total += F.cross_entropy(logits, labels[0, 1:], ignore_index=-100, reduction="sum").item()
        count += len(response)
    return total / count


def head(path, n):
    return [json.loads(line) for line in path.read_text().splitlines()[:n]]
