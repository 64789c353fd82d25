#!/usr/bin/env python3
"""Stage 02: fetch the base model and write it as an HF safetensors directory, a tokenizer and config.json.

Sources (model.download.source)
  a .gguf file            dequantized to fp32 by transformers + gguf (the demo's SmolLM2-135M-Instruct)
  a local HF directory    config.json + *.safetensors (with index when sharded) or pytorch_model.bin
  a Meta checkpoint dir   params.json + consolidated.00.pth (Meta's original release), converted to the HF
                          layout (q/k rows permuted to HF's RoPE convention); HF tokenizer files beside it
  a Hub repo id           e.g. meta-llama/Meta-Llama-3-8B; only config, safetensors, tokenizer and generation
                          config are fetched. Gated repos need a token: HF_TOKEN or `huggingface-cli login`;
                          the token is never printed or written. Files land in the standard HF cache
                          (HF_HUB_CACHE), so a model already downloaded there is not fetched again.

Outputs (config keys)
  model.hf_weights_dir    safetensors (+ model.safetensors.index.json when sharded), config.json,
                          resolved_config.yaml
  data.tokenizer.type     tokenizer directory (+ resolved_config.yaml); BOS/EOS as the model's, pad = EOS when
                          the model has none (padding is never attended to nor trained, so any id works). It may
                          be the weights directory itself, as in a Hugging Face model directory.
  model.model_config      config.json of the base model (a copy beside, or the one in model.hf_weights_dir)
Each output is written under a temporary name and renamed when complete and verified (architecture is
LlamaForCausalLM or MistralForCausalLM without a sliding window below the training length, no bias tensors,
every shard the index names exists, tensor shapes agree with config.json). An earlier output of this stage is
replaced, unless it holds files beside those its resolved_config.yaml lists as written (a note or a folder of
yours: the run is refused naming them); an existing path that this stage did not write (no resolved_config.yaml of
02 in it, or a model_config file that differs from the weights' config.json) is refused before anything is fetched.

Commands (the same on CPU, CUDA and Trainium hosts; this stage needs no accelerator)
  python 02_download_model.py --config config.yaml
  python 02_download_model.py --config config.yaml --config demo.yaml      # demo: needs DEMO_GGUF set
"""

import argparse
import json
import os
import re
import shutil
import sys
from pathlib import Path

import yaml

# ------------------------------------------------------------------------------------------------ settings
STAGE = "02_download_model.py"


# The config keys this stage reads and their types (validated before any work starts).
SCHEMA = {
    "model.download.source": "path",
    "model.download.revision": "str?",
    "model.hf_weights_dir": "path",
    "model.model_config": "path",
    "data.tokenizer.type": "path",
}


# ------------------------------------------------------------------------------------------------ sources
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}  # the same tensors
HUB_FILES = [
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
]


def fetch_from_hub(repo_id, revision):
    """Download only the files a LoRA run needs; the token comes from HF_TOKEN or the login cache."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    # Messages are built from the repo id only: exception texts can quote request headers.
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=HUB_FILES))
    except GatedRepoError:
        raise StageError(
            f"{repo_id} is gated: accept its licence on its Hub page, then provide a token with "
            f"`export HF_TOKEN=...` or `hf auth login`"
        ) from None
    except RepositoryNotFoundError:
        raise StageError(
            f"{repo_id}: no such repository on the Hub (or it is private and no valid token was given)"
        ) from None
    except RevisionNotFoundError:
        raise StageError(f"{repo_id}: revision {revision!r} not found (model.download.revision)") from None
    except LocalEntryNotFoundError:
        raise StageError(
            f"{repo_id}: not in the local HF cache and the Hub cannot be reached (no network, or HF_HUB_OFFLINE=1)"
        ) from None
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", "?")
        raise StageError(f"{repo_id}: the Hub answered HTTP {status}") from None


META_NAMES = {
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w2": "mlp.down_proj",
    "feed_forward.w3": "mlp.up_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


def write_from_meta(src, weights_tmp, tok_tmp):
    """Convert Meta's original checkpoint (params.json + consolidated.00.pth) to the HF layout.

    Meta's q/k rows interleave the two halves of each rotary pair; HF's rotate-half RoPE wants them split,
    so q_proj and k_proj rows are permuted per head (the same permutation as transformers' own converter)."""
    from transformers import AutoTokenizer

    params = json.loads((src / "params.json").read_text())
    shards = sorted(src.glob("consolidated.*.pth"))
    if len(shards) != 1:
        raise StageError(
            f"{src}: expected one consolidated.00.pth (an 8B checkpoint), found {len(shards)}; "
            f"model-parallel Meta checkpoints are not supported, use the HF release instead"
        )
    try:
        state = load_torch_file(shards[0])
    except Exception as e:
        raise StageError(f"{shards[0]}: not a readable torch checkpoint ({type(e).__name__}: {e})") from None
    dim, heads = params["dim"], params["n_heads"]
    kv, head_dim = params.get("n_kv_heads") or heads, dim // heads

    def to_rotate_half(w, n):
        return w.view(n, head_dim // 2, 2, w.shape[1]).transpose(1, 2).reshape(n * head_dim, w.shape[1])

    out = {}
    for name, t in state.items():
        if name == "rope.freqs":  # a precomputed buffer in older releases, not a weight
            continue
        top = {
            "tok_embeddings.weight": "model.embed_tokens.weight",
            "norm.weight": "model.norm.weight",
            "output.weight": "lm_head.weight",
        }
        m = re.fullmatch(r"layers\.(\d+)\.(.+)\.weight", name)
        if name in top:
            out[top[name]] = t
        elif m and m.group(2) in META_NAMES:
            if m.group(2) == "attention.wq":
                t = to_rotate_half(t, heads)
            elif m.group(2) == "attention.wk":
                t = to_rotate_half(t, kv)
            out[f"model.layers.{m.group(1)}.{META_NAMES[m.group(2)]}.weight"] = t
        else:
            raise StageError(f"{shards[0]}: unexpected tensor '{name}' for a Llama checkpoint")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(src))
    except Exception:
        raise StageError(
            f"{src}: no HF tokenizer files (tokenizer.json, tokenizer_config.json) beside the Meta "
            f"checkpoint; copy them from the model's HF release into {src}"
        ) from None
    embed = out["model.embed_tokens.weight"]
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "hidden_size": dim,
        "intermediate_size": out["model.layers.0.mlp.gate_proj.weight"].shape[0],
        "num_hidden_layers": params["n_layers"],
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "vocab_size": embed.shape[0],
        "rms_norm_eps": params.get("norm_eps", 1e-5),
        "rope_theta": params.get("rope_theta", 10000.0),
        "max_position_embeddings": params.get("max_seq_len", 8192),
        "tie_word_embeddings": "lm_head.weight" not in out,
        "torch_dtype": str(embed.dtype).replace("torch.", ""),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "attention_bias": False,
        "mlp_bias": False,
    }
    if params.get("use_scaled_rope"):  # Llama 3.1: the frequency scaling of its release
        config["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": params.get("rope_scaling_factor", 8.0),
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        }
    save_sharded(out, weights_tmp)
    (weights_tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tokenizer.save_pretrained(str(tok_tmp))


def write_from_gguf(gguf, weights_tmp, tok_tmp):
    """Dequantize a GGUF file (weights to fp32) into an HF directory and a tokenizer directory."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except Exception as e:
        raise StageError(f"{gguf}: cannot be read as a GGUF model ({type(e).__name__}: {e})") from None
    # transformers refuses to save a model loaded from GGUF, so the dequantized tensors are written directly.
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["architectures"] = [ARCHITECTURES.get(config.get("model_type"), "LlamaForCausalLM")]
    tied = config.get("tie_word_embeddings", False)
    save_sharded({k: v for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}, weights_tmp)
    (weights_tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tokenizer.save_pretrained(str(tok_tmp))


def write_from_hf_dir(src, weights_tmp, tok_tmp):
    """Copy an HF model directory's config and weights (.bin converted to safetensors) and its tokenizer."""
    from transformers import AutoTokenizer

    if not (src / "config.json").exists():
        raise StageError(f"model.download.source: {src} has no config.json (not an HF model directory)")
    shutil.copy2(src / "config.json", weights_tmp / "config.json")
    if (src / "generation_config.json").exists():
        shutil.copy2(src / "generation_config.json", weights_tmp / "generation_config.json")
    shards = sorted(src.glob("*.safetensors"))
    if shards:
        for f in shards + sorted(src.glob("model.safetensors.index.json")):
            shutil.copy2(f, weights_tmp / f.name)
    elif (src / "pytorch_model.bin").exists():
        save_sharded(load_torch_file(src / "pytorch_model.bin", mmap=False), weights_tmp)
    else:
        raise StageError(f"model.download.source: {src} has neither *.safetensors nor pytorch_model.bin")
    try:
        AutoTokenizer.from_pretrained(str(src)).save_pretrained(str(tok_tmp))
    except Exception as e:
        raise StageError(f"{src}: no usable tokenizer ({type(e).__name__}: {e})") from None


def finish_tokenizer(tok_tmp):
    """Make sure BOS/EOS are set and choose a pad token: the model's own, else EOS."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tok_tmp))
    if tokenizer.eos_token_id is None:
        raise StageError("the tokenizer defines no EOS token; the SFT data format needs one")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
        tokenizer.save_pretrained(str(tok_tmp))
    return tokenizer


# ------------------------------------------------------------------------------------------------ verify
def expected_shapes(config):
    """{HF tensor name: shape} that a LlamaForCausalLM with this config.json must hold."""
    h, inter, heads = config["hidden_size"], config["intermediate_size"], config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or heads
    hd = config.get("head_dim") or h // heads
    shapes = {"model.embed_tokens.weight": (config["vocab_size"], h), "model.norm.weight": (h,)}
    if not config.get("tie_word_embeddings", False):
        shapes["lm_head.weight"] = (config["vocab_size"], h)
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "self_attn.q_proj.weight": (heads * hd, h),
                p + "self_attn.k_proj.weight": (kv * hd, h),
                p + "self_attn.v_proj.weight": (kv * hd, h),
                p + "self_attn.o_proj.weight": (h, heads * hd),
                p + "mlp.gate_proj.weight": (inter, h),
                p + "mlp.up_proj.weight": (inter, h),
                p + "mlp.down_proj.weight": (h, inter),
                p + "input_layernorm.weight": (h,),
                p + "post_attention_layernorm.weight": (h,),
            }
        )
    return shapes


def verify_weights(weights_dir, source):
    """Architecture, shard files and every tensor's shape against config.json; returns (tensors, bytes).
    Errors name the source the user gave, not the temporary directory being checked."""
    from safetensors import safe_open

    config = json.loads((weights_dir / "config.json").read_text())
    arch, family = (config.get("architectures") or ["?"])[0], config.get("model_type", "llama")
    if ARCHITECTURES.get(family) != arch:
        raise StageError(
            f"{source}: architecture {arch} (model_type {family}), expected one of "
            f"{sorted(ARCHITECTURES.values())} with its model_type"
        )
    for key in ("attention_bias", "mlp_bias"):
        if config.get(key):
            raise StageError(f"{source}: config.json sets '{key}: true'; the Llama model trained here has no biases")
    index = weights_dir / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = [p.name for p in sorted(weights_dir.glob("*.safetensors"))]
    shapes, total = {}, 0
    for name in files:
        path = weights_dir / name
        if not path.exists():
            raise StageError(f"{source}: shard {name}, named in model.safetensors.index.json, is missing")
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    shapes[key] = tuple(f.get_slice(key).get_shape())
        except Exception as e:
            raise StageError(f"{source}: {name} is not a readable safetensors file ({type(e).__name__}: {e})") from None
        total += path.stat().st_size
    biases = sorted(k for k in shapes if k.endswith(".bias"))
    if biases:
        raise StageError(
            f"{source}: tensor '{biases[0]}' is a bias ({len(biases)} in all); the Llama model trained here has none"
        )
    expected = expected_shapes(config)
    for key, shape in expected.items():
        if key not in shapes:
            raise StageError(f"{source}: tensor '{key}' missing")
        if shapes[key] != shape:
            raise StageError(
                f"{source}: tensor '{key}' has shape {list(shapes[key])}, config.json implies {list(shape)}"
            )
    return len(shapes), total


# ------------------------------------------------------------------------------------------------ outputs
def inside(a, b):
    return a.absolute() != b.absolute() and b.absolute() in a.absolute().parents


def check_outputs(weights_dir, tok_dir, config_path):
    """Pre-flight, before anything is fetched: every output can be written and replaces only an earlier output
    of this stage. The tokenizer may share the weights directory and config.json may be the one inside it;
    other nestings are refused, since publishing one output would replace another."""
    if inside(weights_dir, tok_dir) or inside(tok_dir, weights_dir):
        raise StageError(
            f"model.hf_weights_dir ({weights_dir}) and data.tokenizer.type ({tok_dir}): one lies inside "
            f"the other; use one directory for both or two separate ones"
        )
    config_in_weights = config_path.absolute() == (weights_dir / "config.json").absolute()
    if not config_in_weights and (inside(config_path, weights_dir) or inside(config_path, tok_dir)):
        raise StageError(
            f"model.model_config: {config_path} lies inside an output directory of this stage; use "
            f"{weights_dir / 'config.json'} or a path outside it"
        )
    for key, d in (("model.hf_weights_dir", weights_dir), ("data.tokenizer.type", tok_dir)):
        if d.exists() and not d.is_dir():
            raise StageError(f"{key}: {d} is a file; this key names a directory")
        own = written_by_this_stage(d / "resolved_config.yaml")
        if d.is_dir() and any(d.iterdir()) and not own:
            refuse_foreign(d, key, "no resolved_config.yaml of this stage in it")
        if own and unrecorded(d):
            raise StageError(
                f"{key}: {d} holds {', '.join(unrecorded(d))} beside what 02 wrote there; replacing its output would "
                f"delete them, so nothing is done: move them out of it, or choose another directory"
            )
        check_writable(d, key)
    if not config_in_weights:
        if config_path.is_dir():
            raise StageError(f"model.model_config: {config_path} is a directory; this key names a config.json file")
        ours = weights_dir / "config.json"
        same = (
            written_by_this_stage(weights_dir / "resolved_config.yaml")
            and ours.is_file()
            and config_path.is_file()
            and config_path.read_bytes() == ours.read_bytes()
        )
        if config_path.exists() and not same:
            refuse_foreign(config_path, "model.model_config", f"it is not the config.json of {weights_dir}")
        check_writable(config_path, "model.model_config")


# ------------------------------------------------------------------------------------------------ main
def check_source(source):
    """Pre-flight: a local source exists; anything else must look like a Hub repo id (owner/name)."""
    src = Path(source)
    if source.endswith(".gguf") and not src.is_file():
        raise StageError(f"model.download.source: GGUF file {src} not found")
    if (
        not source.endswith(".gguf")
        and not src.is_dir()
        and (source.startswith((".", "/", "~")) or source.count("/") != 1)
    ):
        raise StageError(
            f"model.download.source: {source} is neither a directory, a .gguf file nor a Hub repo id (owner/name)"
        )


def write_model(source, c, weights_tmp, tok_tmp):
    """Bring the source into the temporary weights and tokenizer directories."""
    src = Path(source)
    if source.endswith(".gguf"):
        print(f"dequantizing {src}")
        write_from_gguf(src, weights_tmp, tok_tmp)
        return
    if not src.is_dir():
        print(f"fetching {source} from the Hugging Face Hub")
        src = fetch_from_hub(source, c["model.download.revision"])
    if (src / "params.json").exists() and not (src / "config.json").exists():
        print(f"converting Meta checkpoint {src}")
        write_from_meta(src, weights_tmp, tok_tmp)
    else:
        write_from_hf_dir(src, weights_tmp, tok_tmp)


def main(argv=None):
    args = config_arg_parser(__doc__).parse_intermixed_args(argv)
    paths = args.config or ["config.yaml"]
    c = resolve(load_config(paths, args.overrides), SCHEMA)
    show_settings(c, paths, args.overrides, SCHEMA)
    weights_dir, tok_dir, config_path = (
        Path(c["model.hf_weights_dir"]),
        Path(c["data.tokenizer.type"]),
        Path(c["model.model_config"]),
    )
    check_source(c["model.download.source"])
    check_outputs(weights_dir, tok_dir, config_path)
    one_dir = weights_dir.absolute() == tok_dir.absolute()  # tokenizer files beside the weights, as on the Hub
    config_in_weights = config_path.absolute() == (weights_dir / "config.json").absolute()
    weights_tmp = staging(weights_dir)
    tok_tmp = weights_tmp if one_dir else staging(tok_dir)
    config_tmp = None if config_in_weights else staging(config_path)
    try:
        write_model(c["model.download.source"], c, weights_tmp, tok_tmp)
        count, size = verify_weights(weights_tmp, c["model.download.source"])
        tokenizer = finish_tokenizer(tok_tmp)
        for tmp in {weights_tmp, tok_tmp}:
            save_config(c, tmp / "resolved_config.yaml", files_of(tmp))
        if config_tmp is not None:
            shutil.copy2(weights_tmp / "config.json", config_tmp / config_path.name)
        publish(weights_tmp, weights_dir)
        if not one_dir:
            publish(tok_tmp, tok_dir)
        if config_tmp is not None:
            publish(config_tmp / config_path.name, config_path)
    finally:
        for tmp in {weights_tmp, tok_tmp, config_tmp} - {None}:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"weights: {weights_dir} ({count} tensors, {size / 2**20:.1f} MiB)")
    print(
        f"tokenizer: {tok_dir} (bos {tokenizer.bos_token!r}, eos {tokenizer.eos_token!r}, pad {tokenizer.pad_token!r})"
    )
    print(f"config: {config_path}")


# ------------------------------------------------------------------------------------------------ shared
# Helpers repeated at the end of every stage so that each stage can be copied alone: each stage carries those it
# calls, and tests/test_config.py keeps every copy of one identical, by name. STAGE (the stage's file name) is
# defined by each stage in its settings section.
class StageError(Exception):
    """Bad input: reported as one line on stderr with exit status 1; no partial output is left behind."""


def load_config(paths, overrides):
    """Overlay the YAML files in order, then `dotted.key=value` overrides; the first file defines the keys."""
    cfg = None
    for path in paths:
        try:
            data = yaml.load(Path(path).read_text(), Loader=UniqueKeyLoader)
        except FileNotFoundError:
            raise StageError(f"{path}: config file not found") from None
        except IsADirectoryError:
            raise StageError(f"{path}: is a directory, expected a YAML config file") from None
        except yaml.YAMLError as e:
            raise StageError(f"{path}:{yaml_error_place(e)} not valid YAML ({yaml_error_reason(e)})") from None
        if not isinstance(data, dict):
            raise StageError(f"{path}: expected a mapping of config sections at the top level")
        cfg = data if cfg is None else overlay(cfg, data, path)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise StageError(f"override {item!r}: expected dotted.key=value")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise StageError(f"override {item!r}: the value is not valid YAML ({yaml_error_reason(e)})") from None
        for part in reversed(key.split(".")):
            value = {part: value}
        overlay(cfg, value, "command line")
    return cfg


class UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key written twice in one mapping (PyYAML would keep the last one silently:
    a second `trainer:` section would drop the first one's keys)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key '{key}' written twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def yaml_error_place(e):
    """'line:column:' of a YAML error (1-based), or '' when PyYAML gives no position."""
    mark = getattr(e, "problem_mark", None)
    return f"{mark.line + 1}:{mark.column + 1}:" if mark is not None else ""


def yaml_error_reason(e):
    """PyYAML's problem, and where the construct it was reading began when that is elsewhere."""
    reason = " ".join(str(getattr(e, "problem", None) or e).split())
    context, mark = getattr(e, "context", None), getattr(e, "context_mark", None)
    if context and mark is not None and mark.line != getattr(getattr(e, "problem_mark", None), "line", None):
        reason += f"; {context} that began at line {mark.line + 1}, column {mark.column + 1}"
    return reason


def overlay(base, new, source, prefix="", root=None):
    """Merge `new` into `base` in place; a key that `base` lacks is an error (typos never pass silently) that
    names the closest known keys."""
    root = base if root is None else root
    for k, v in new.items():
        key = f"{prefix}{k}"
        if k not in base:
            raise StageError(f"{source}: unknown key '{key}'{did_you_mean(str(k), base, prefix, root)}")
        if isinstance(base[k], dict):
            if not isinstance(v, dict):
                raise StageError(f"{source}: '{key}' is a section; set its keys instead ({key}.<name>=...)")
            overlay(base[k], v, source, key + ".", root)
        else:
            base[k] = v
    return base


def did_you_mean(name, section, prefix, root):
    """'; did you mean ...?' naming keys of the same section spelled alike, or keys of that name elsewhere."""
    import difflib

    def dotted(node, pre=""):
        for k, v in node.items():
            yield from dotted(v, f"{pre}{k}.") if isinstance(v, dict) else [f"{pre}{k}"]

    near = [prefix + m for m in difflib.get_close_matches(name, [str(k) for k in section], n=3, cutoff=0.7)]
    if not near:
        keys = list(dotted(root))
        leaves = difflib.get_close_matches(name, {k.rsplit(".", 1)[-1] for k in keys}, n=2, cutoff=0.8)
        near = [k for k in keys if k.rsplit(".", 1)[-1] in leaves][:3]
    return f"; did you mean {' or '.join(repr(k) for k in near)}?" if near else ""


def resolve(cfg, schema):
    """{dotted key: value} for the keys this stage reads, each checked against its type and range; paths expanded.
    A spec is a type, optionally followed by a range. Types: int, float, bool, str, path (str with ~ and ${ENV}
    expanded), list[str], list[float], a|b|c (one of these strings); str+ and path+ also take a non-empty list of
    them (kept as a list); a trailing ? allows null. Ranges: '>= 1', '> 0', 'in [0, 1)' (brackets as in
    mathematics), checked for numbers and for every item of a list."""
    out = {}
    for key, spec in schema.items():
        node = cfg
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                raise StageError(f"config: missing key '{key}' (expected {spec})")
            node = node[part]
        kind, _, bounds = spec.partition(" ")
        nullable, kind = kind.endswith("?"), kind.rstrip("?")
        if kind.endswith("+") and isinstance(node, list) and node and all(isinstance(v, str) for v in node):
            out[key] = [os.path.expanduser(os.path.expandvars(v)) if kind == "path+" else v for v in node]
            continue
        kind = kind.rstrip("+")
        if node is None:
            if not nullable:
                raise StageError(f"config: '{key}' must be {kind}, got null")
        elif "|" in kind:
            if node not in kind.split("|"):
                raise StageError(f"config: '{key}' must be one of {kind.split('|')}, got {node!r}")
        elif kind.startswith("list["):
            item = {"list[str]": str, "list[float]": (int, float)}[kind]
            if not isinstance(node, list) or not all(isinstance(x, item) and not isinstance(x, bool) for x in node):
                raise StageError(f"config: '{key}' must be {kind}, got {node!r}")
            if bounds and not all(within(x, bounds) for x in node):
                raise StageError(f"config: every item of '{key}' must be {bounds}, got {node!r}")
        else:
            if kind == "float" and isinstance(node, str):
                try:  # YAML reads 1e-6 (no dot) as a string; a number is clearly meant
                    node = float(node)
                except ValueError:
                    pass
            types = {"int": int, "float": (int, float), "bool": bool, "str": str, "path": str}[kind]
            if not isinstance(node, types) or (isinstance(node, bool) and kind != "bool"):
                raise StageError(f"config: '{key}' must be {kind}, got {type(node).__name__} {node!r}")
            if kind == "float":
                node = float(node)
            if bounds and not within(node, bounds):
                raise StageError(f"config: '{key}' must be {bounds}, got {node!r}")
            if kind == "path":
                node = os.path.expanduser(os.path.expandvars(node))
                if "$" in node:
                    raise StageError(f"config: '{key}': an environment variable in {node!r} is not set")
        out[key] = node
    return out


def within(x, bounds):
    """x satisfies a range of the schema: '>= a', '> a' or 'in [a, b)' with either bracket at either end; never an
    infinity or NaN."""
    if not -float("inf") < x < float("inf"):
        return False
    if bounds.startswith(">"):
        op, limit = bounds.split()
        return x >= float(limit) if op == ">=" else x > float(limit)
    lo, hi = bounds.removeprefix("in ").split(", ")
    return (x >= float(lo[1:]) if lo[0] == "[" else x > float(lo[1:])) and (
        x <= float(hi[:-1]) if hi[-1] == "]" else x < float(hi[:-1])
    )


def redacted(c):
    """The resolved config with anything that looks like a secret masked, for printing and saving."""
    secret = {"token", "secret", "password", "credential", "credentials"}
    return {k: ("***" if secret & set(k.lower().replace("_", ".").split(".")) and v else v) for k, v in c.items()}


def show_settings(c, paths, overrides, schema):
    """Print, section by section, the keys whose value differs from the first config file's (config.yaml in
    every documented command): what this launch changes. The whole resolved config is saved beside outputs."""
    try:
        base = redacted(resolve(load_config(paths[:1], []), schema))
    except StageError:
        base = {}
    changed = {k: v for k, v in redacted(c).items() if k not in base or base[k] != v}
    given = " + ".join(str(p) for p in paths) + (f" + {len(overrides)} override(s)" if overrides else "")
    print(f"settings: {given}" + (f"; differing from {paths[0]}:" if changed else f" (as {paths[0]})"))

    def shown(v):  # as YAML reads it
        if isinstance(v, list):
            return f"[{', '.join(map(shown, v))}]"
        return v if isinstance(v, str) else json.dumps(v)

    sections = {}
    for key, value in changed.items():
        section, _, rest = key.partition(".")
        sections.setdefault(section if rest else "", []).append(f"{rest or section}={shown(value)}")
    for section, items in sections.items():
        line = f"  {section + ': ' if section else ''}"
        for item in items:
            if len(line) + len(item) > 118 and line.strip():
                print(line.rstrip())
                line = "    "
            line += item + " "
        print(line.rstrip())


def save_config(c, path, files=()):
    """Write the resolved config (nested YAML, secrets masked) next to an output, atomically. Its first line
    names the stage, which is how a stage recognises an output as its own (written_by_this_stage); `files`, the
    files the output consists of, are listed as files_written, so that a later run replaces those only."""
    nested = {}
    for key, value in redacted(c).items():
        *parents, leaf = key.split(".")
        node = nested
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    listed = yaml.safe_dump({"files_written": sorted(files)}) if files else ""
    header = f"# written by {STAGE}: the resolved config of this output\n"
    write_atomically(path, header + yaml.safe_dump(nested, sort_keys=False) + listed)


def written_by_this_stage(config_path):
    """True when `config_path` is a resolved config that this stage saved (see save_config)."""
    try:
        with open(config_path, encoding="utf-8") as f:
            return f.readline().startswith(f"# written by {STAGE}:")
    except (OSError, UnicodeDecodeError):
        return False


def files_of(out):
    """The files under a directory, as paths relative to it: what an output of this stage consists of."""
    return [str(p.relative_to(out)) for p in Path(out).rglob("*") if p.is_file()]


def unrecorded(out):
    """What an output directory of this stage holds beside the files its resolved_config.yaml lists as written (a
    note, a model card or an evaluation folder of yours)."""
    saved = yaml.safe_load((Path(out) / "resolved_config.yaml").read_text())
    written, extra = {*saved["files_written"], "resolved_config.yaml"}, []
    for p in sorted(Path(out).rglob("*")):
        rel = p.relative_to(out)
        theirs = str(rel) not in written and not (p.is_dir() and any(w.startswith(f"{rel}/") for w in written))
        if theirs and not any(rel.is_relative_to(e) for e in extra):  # a folder of yours is named, not its files
            extra.append(rel)
    return [f"{e}/" if (Path(out) / e).is_dir() else str(e) for e in extra]


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one-line StageErrors (exit status 1) that suggest the closest option."""

    def error(self, message):
        import difflib

        hint = ""
        for arg in message.partition("unrecognized arguments: ")[2].split():
            near = difflib.get_close_matches(arg, list(self._option_string_actions), n=1, cutoff=0.6)
            hint += f"; did you mean {near[0]!r} for {arg!r}?" if near else ""
        raise StageError(f"{message}{hint} (see --help)")


def config_arg_parser(doc):
    """--config (repeatable, later files overlay earlier ones) and key=value overrides; --help shows `doc`."""
    ap = ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--config", action="append", metavar="PATH", help="YAML config; repeat to overlay (default: config.yaml)"
    )
    ap.add_argument(
        "overrides", nargs="*", metavar="dotted.key=value", help="config overrides (before or after the options)"
    )
    return ap


def check_writable(path, key):
    """Pre-flight: `path` (an output that may not exist yet) can be created: its nearest existing ancestor is a
    directory that this process may write to. Nothing is created."""
    here = Path(path).absolute().parent
    while not here.exists():
        here = here.parent
    if not here.is_dir():
        raise StageError(f"{key}: cannot write {path}: {here} is a file, not a directory")
    if not os.access(here, os.W_OK | os.X_OK):
        raise StageError(f"{key}: cannot write {path}: {here} is not writable")


def refuse_foreign(path, key, reason):
    """An output path holds something this stage did not write: it is never replaced, so the stage stops."""
    raise StageError(
        f"{key}: {path} exists and was not written by {STAGE} ({reason}); it is left as it is: move "
        f"it away or choose another path"
    )


def write_atomically(path, text):
    """A small text file written under <path>.tmp, then renamed: a reader never sees half of it."""
    tmp = Path(f"{path}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def staging(final):
    """A fresh temporary directory on the filesystem of `final`, so that publishing it is a rename: beside
    `final`, or in its nearest existing ancestor while the parents do not exist (publish makes them, so a stage
    that fails leaves no empty directories behind)."""
    final = Path(final)
    home = final.parent
    while not home.exists():
        home = home.parent
    tmp = home / (str(final.relative_to(home)).replace(os.sep, "_") + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def publish(tmp, final):
    """Move a finished temporary file or directory into place, replacing an earlier output of the same stage;
    an old directory is renamed aside first (and put back if the move fails), so `final` is never a mix of old
    and new."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    if not final.is_dir():
        os.replace(tmp, final)
        return
    old = final.with_name(final.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(final, old)
    try:
        os.replace(tmp, final)
    except OSError:
        os.replace(old, final)
        raise
    shutil.rmtree(old)


def load_torch_file(path, mmap=True):
    """A file written by torch.save, loaded as plain tensors and containers only (weights_only: no code runs)."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:
        raise StageError(f"{path}: not a readable torch checkpoint ({type(e).__name__}: {e})") from None


def save_sharded(state, out_dir, max_shard_bytes=5 * 2**30):
    """Write tensors as safetensors shards of at most max_shard_bytes, with an index when there are several."""
    from safetensors.torch import save_file

    shards, current, size = [], {}, 0
    for name, t in state.items():
        n = t.numel() * t.element_size()
        if current and size + n > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = t.contiguous()
        size += n
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], str(out_dir / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out_dir / fname), metadata={"format": "pt"})
        weight_map.update({name: fname for name in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    write_atomically(
        out_dir / "model.safetensors.index.json",
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n",
    )


# ------------------------------------------------------------------------------------------------ entry point
if __name__ == "__main__":
    try:
        main()
    except StageError as e:
        sys.exit(f"error: {e}")
