#!/usr/bin/env python3
"""Stage 03: convert an HF safetensors checkpoint into the NxDT sharded layout that 05 (and NxD) load.

Layout written (the same as NxD's converter with --qkv_linear True --hw_backend trn1)
  <exp_manager.resume_from_checkpoint>/model/dp_rank_00_tp_rank_00_pp_rank_00.pt
  a torch.save of a flat {name: tensor} dict, HF names except:
    model.layers.{i}.self_attn.qkv_proj.weight_q|weight_k|weight_v   (q/k/v_proj; one weight_qkv = cat(q, k, v)
                                                                      when model.fuse_qkv is true)
    model.layers.{i}.mlp.gate_up_proj.weight                         (cat(gate_proj, up_proj))
  plus resolved_config.yaml beside model/. Tensors keep the source dtype. With tied embeddings there is no
  lm_head.weight. This version writes tensor- and pipeline-parallel size 1 (one shard).

Inputs: model.hf_weights_dir (safetensors, sharded with an index or single), model.model_config.
Tensors are read one at a time from the memory-mapped safetensors files; the output is written to a temporary
directory and renamed when complete, and an existing non-empty output is refused unless --overwrite is given.

Commands (the same on CPU, CUDA and Trainium hosts; this stage needs no accelerator)
  python 03_convert_checkpoint.py --config config.yaml
  python 03_convert_checkpoint.py --config config.yaml --config demo.yaml --overwrite
"""

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import torch
import yaml

# ------------------------------------------------------------------------------------------------ config
# These helpers are repeated, identical, at the top of every stage so that each stage can be copied alone.


class StageError(Exception):
    """Bad input: reported as one line on stderr with exit status 1; no partial output is left behind."""


def load_config(paths, overrides):
    """Overlay the YAML files in order, then `dotted.key=value` overrides; the first file defines the keys."""
    cfg = None
    for path in paths:
        try:
            data = yaml.safe_load(Path(path).read_text())
        except FileNotFoundError:
            raise StageError(f"{path}: config file not found") from None
        except yaml.YAMLError as e:
            raise StageError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise StageError(f"{path}: expected a mapping of config sections at the top level")
        cfg = data if cfg is None else overlay(cfg, data, path)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise StageError(f"override {item!r}: expected dotted.key=value")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            raise StageError(f"override {item!r}: value is not a YAML scalar or list") from None
        for part in reversed(key.split(".")):
            value = {part: value}
        overlay(cfg, value, "command line")
    return cfg


def overlay(base, new, source, prefix=""):
    """Merge `new` into `base` in place; a key that `base` lacks is an error (typos never pass silently)."""
    for k, v in new.items():
        key = f"{prefix}{k}"
        if k not in base:
            raise StageError(f"{source}: unknown key '{key}'")
        if isinstance(base[k], dict):
            if not isinstance(v, dict):
                raise StageError(f"{source}: '{key}' is a section; set its keys instead ({key}.<name>=...)")
            overlay(base[k], v, source, key + ".")
        else:
            base[k] = v
    return base


def resolve(cfg, schema):
    """{dotted key: value} for the keys this stage reads, each checked against its type; paths expanded.

    Types: int, float, bool, str, path (str with ~ and ${ENV} expanded), list[str], list[float], a|b|c (one of these
    strings); a trailing ? also allows null.
    """
    out = {}
    for key, spec in schema.items():
        node = cfg
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                raise StageError(f"config: missing key '{key}' (expected {spec})")
            node = node[part]
        kind = spec.rstrip("?")
        if node is None:
            if not spec.endswith("?"):
                raise StageError(f"config: '{key}' must be {kind}, got null")
        elif "|" in kind:
            if node not in kind.split("|"):
                raise StageError(f"config: '{key}' must be one of {kind.split('|')}, got {node!r}")
        elif kind.startswith("list["):
            item = {"list[str]": str, "list[float]": (int, float)}[kind]
            if not isinstance(node, list) or not all(isinstance(x, item) and not isinstance(x, bool) for x in node):
                raise StageError(f"config: '{key}' must be {kind}, got {node!r}")
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
            if kind == "path":
                node = os.path.expanduser(os.path.expandvars(node))
                if "$" in node:
                    raise StageError(f"config: '{key}': an environment variable in {node!r} is not set")
        out[key] = node
    return out


def redacted(c):
    """The resolved config with anything that looks like a secret masked, for printing and saving."""
    secret = {"token", "secret", "password", "credential", "credentials"}
    return {k: ("***" if secret & set(k.lower().replace("_", ".").split(".")) and v else v) for k, v in c.items()}


def save_config(c, path):
    """Write the resolved config (nested YAML, secrets masked) next to an output, atomically."""
    nested = {}
    for key, value in redacted(c).items():
        *parents, leaf = key.split(".")
        node = nested
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    tmp = Path(f"{path}.tmp")
    tmp.write_text(yaml.safe_dump(nested, sort_keys=False))
    os.replace(tmp, path)


def config_arg_parser(doc):
    """--config (repeatable, later files overlay earlier ones) and key=value overrides."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", action="append", metavar="PATH",
                    help="YAML config; repeat to overlay (default: config.yaml)")
    ap.add_argument("overrides", nargs="*", metavar="dotted.key=value", help="config overrides")
    return ap

# ------------------------------------------------------------------------------------------------ settings
# The config keys this stage reads and their types (validated before any work starts).
SCHEMA = {
    "model.hf_weights_dir": "path",
    "model.model_config": "path",
    "model.fuse_qkv": "bool",
    "exp_manager.resume_from_checkpoint": "path",
    "distributed_strategy.tensor_model_parallel_size": "int",
    "distributed_strategy.pipeline_model_parallel_size": "int",
    "distributed_strategy.kv_replicator": "int",
}
SHARD = "dp_rank_00_tp_rank_00_pp_rank_00.pt"


# ------------------------------------------------------------------------------------------------ inputs
def read_config(path):
    try:
        config = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise StageError(f"model.model_config: {path} not found (stage 02 writes it)") from None
    arch = (config.get("architectures") or ["LlamaForCausalLM"])[0]
    if arch != "LlamaForCausalLM":
        raise StageError(f"{path}: architecture {arch}, expected LlamaForCausalLM")
    return config


def weight_files(weights_dir):
    """{tensor name: safetensors file} from the index, or from the single model.safetensors."""
    index = weights_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: weights_dir / f for name, f in weight_map.items()}
    files = sorted(weights_dir.glob("*.safetensors"))
    if len(files) != 1:
        raise StageError(f"model.hf_weights_dir: {weights_dir} needs model.safetensors.index.json or exactly one "
                         f"*.safetensors file (found {len(files)})")
    from safetensors import safe_open

    with safe_open(str(files[0]), framework="pt") as f:
        return {name: files[0] for name in f.keys()}


class TensorReader:
    """Reads named tensors lazily from memory-mapped safetensors files, keeping each file open once."""

    def __init__(self, files):
        self.files, self.open = files, {}

    def get(self, name):
        from safetensors import safe_open

        path = self.files.get(name)
        if path is None:
            raise StageError(f"HF checkpoint: tensor '{name}' missing")
        if path not in self.open:
            if not path.exists():
                raise StageError(f"{path}: shard named in the index is missing")
            try:
                self.open[path] = safe_open(str(path), framework="pt")
            except Exception as e:
                raise StageError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None
        try:
            return self.open[path].get_tensor(name)
        except Exception as e:
            raise StageError(f"{path}: tensor '{name}' cannot be read ({type(e).__name__}: {e})") from None


# ------------------------------------------------------------------------------------------------ mapping
def nxdt_tensors(config, reader, fuse_qkv):
    """Yield (NxDT name, tensor) for a single-shard checkpoint, checking every shape against config.json."""
    h, inter, heads = config["hidden_size"], config["intermediate_size"], config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or heads
    hd = config.get("head_dim") or h // heads
    tied = config.get("tie_word_embeddings", False)

    def get(name, shape):
        t = reader.get(name)
        if tuple(t.shape) != shape:
            raise StageError(f"HF checkpoint: tensor '{name}' has shape {list(t.shape)}, config.json implies "
                             f"{list(shape)}")
        return t

    yield "model.embed_tokens.weight", get("model.embed_tokens.weight", (config["vocab_size"], h))
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        q = get(p + "self_attn.q_proj.weight", (heads * hd, h))
        k = get(p + "self_attn.k_proj.weight", (kv * hd, h))
        v = get(p + "self_attn.v_proj.weight", (kv * hd, h))
        if fuse_qkv:
            yield p + "self_attn.qkv_proj.weight_qkv", torch.cat([q, k, v])
        else:
            yield p + "self_attn.qkv_proj.weight_q", q
            yield p + "self_attn.qkv_proj.weight_k", k
            yield p + "self_attn.qkv_proj.weight_v", v
        yield p + "self_attn.o_proj.weight", get(p + "self_attn.o_proj.weight", (h, heads * hd))
        yield p + "mlp.gate_up_proj.weight", torch.cat([get(p + "mlp.gate_proj.weight", (inter, h)),
                                                        get(p + "mlp.up_proj.weight", (inter, h))])
        yield p + "mlp.down_proj.weight", get(p + "mlp.down_proj.weight", (h, inter))
        yield p + "input_layernorm.weight", get(p + "input_layernorm.weight", (h,))
        yield p + "post_attention_layernorm.weight", get(p + "post_attention_layernorm.weight", (h,))
    yield "model.norm.weight", get("model.norm.weight", (h,))
    if not tied:
        yield "lm_head.weight", get("lm_head.weight", (config["vocab_size"], h))


def consumed_names(config):
    """The HF tensor names the mapping reads; any other name in the checkpoint is an error."""
    names = {"model.embed_tokens.weight", "model.norm.weight"}
    if not config.get("tie_word_embeddings", False):
        names.add("lm_head.weight")
    for i in range(config["num_hidden_layers"]):
        for leaf in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm",
                     "post_attention_layernorm"):
            names.add(f"model.layers.{i}.{leaf}.weight")
    return names


# ------------------------------------------------------------------------------------------------ main
def main(argv=None):
    ap = config_arg_parser(__doc__.split("\n\n")[0])
    ap.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    args = ap.parse_args(argv)
    c = resolve(load_config(args.config or ["config.yaml"], args.overrides), SCHEMA)
    for k, v in redacted(c).items():
        print(f"  {k}: {v}")
    tp, pp = c["distributed_strategy.tensor_model_parallel_size"], c["distributed_strategy.pipeline_model_parallel_size"]
    if tp != 1 or pp != 1:
        raise StageError(f"this version converts to tensor and pipeline parallel size 1 only (got TP {tp}, PP {pp}); "
                         f"set distributed_strategy.tensor_model_parallel_size=1 pipeline_model_parallel_size=1")
    config = read_config(c["model.model_config"])
    weights_dir = Path(c["model.hf_weights_dir"])
    if not weights_dir.is_dir():
        raise StageError(f"model.hf_weights_dir: {weights_dir} not found (stage 02 writes it)")
    files = weight_files(weights_dir)
    # Tied models may still carry a redundant lm_head copy; it is the embedding, so it is not written.
    unknown = sorted(set(files) - consumed_names(config) - {"lm_head.weight"})
    if unknown:
        raise StageError(f"HF checkpoint: unexpected tensor '{unknown[0]}' ({len(unknown)} in all); "
                         f"is {weights_dir} a Llama model matching {c['model.model_config']}?")
    out = Path(c["exp_manager.resume_from_checkpoint"])
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise StageError(f"exp_manager.resume_from_checkpoint: {out} is not empty; pass --overwrite to replace it")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "model").mkdir(parents=True)
    try:
        state = dict(nxdt_tensors(config, TensorReader(files), c["model.fuse_qkv"]))
        torch.save(state, tmp / "model" / SHARD)
        save_config(c, tmp / "resolved_config.yaml")
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    size = sum(t.numel() * t.element_size() for t in state.values())
    print(f"wrote {out / 'model' / SHARD}: {len(state)} tensors, {size / 2**20:.1f} MiB")


if __name__ == "__main__":
    try:
        main()
    except StageError as e:
        sys.exit(f"error: {e}")
