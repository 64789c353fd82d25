#!/usr/bin/env python3
"""Stage 03: convert an HF safetensors checkpoint into the NxDT sharded layout that 05 (and NxD) load, and back.

Layout written (the same as NxD's converter with --qkv_linear True and the configured --hw_backend)
  <exp_manager.resume_from_checkpoint>/model/dp_rank_00_tp_rank_{TT}_pp_rank_{PP}.pt, one per rank and stage,
  each a torch.save of a flat {name: tensor} dict with HF names except:
    model.layers.{i}.self_attn.qkv_proj.weight_q|weight_k|weight_v   (q/k/v_proj; one weight_qkv = cat(q, k, v)
                                                                      per rank when model.fuse_qkv is true)
    model.layers.{i}.mlp.gate_up_proj.weight                         (per rank cat(gate rows, up rows))
  Split dims: embed, lm_head, q/k/v, gate/up along rows; o_proj, down_proj along columns; norms replicated.
  K/V heads are tiled kv_replicator times before splitting; on trn1 with replication the Q heads (and o_proj
  columns) are permuted so each rank's Q heads belong to its KV head. Layers are split evenly over the
  pipeline stages, remainder on the later stages. Tensors keep the source dtype; tied embeddings have no
  lm_head.weight. Beside model/: resolved_config.yaml and manifest.json (layout settings; per file its size,
  sha256 and every tensor's name, shape and dtype), which --verify and stage 05 check.

Reverse direction (--to-hf DIR): shards reassembled (inverse head permutation, one copy of each replicated KV
  head, which must agree across ranks; gate/up split) into an HF safetensors directory (sharded with an index
  above 5 GiB) with config.json and the tokenizer (data.tokenizer.type). --merge-adapter ADAPTER_DIR also
  merges a PEFT LoRA adapter (05's final/adapter) into the weights, in fp32, then cast to the weights' dtype.

Inputs: model.hf_weights_dir (safetensors, sharded with an index or single, or one pytorch_model.bin),
model.model_config, the distributed_strategy keys; --tp, --pp, --kv-replicator, --hw-backend and
--fuse-qkv / --no-fuse-qkv override them (real booleans: there is no string that means true by accident).
Tensors are read slice by slice from the safetensors files with positioned reads (no memory map), one output shard
at a time, so peak memory stays near the largest output shard. Every output is written to a temporary directory and
renamed when complete; an existing non-empty output is replaced only when it is an earlier output of this stage (a
manifest.json, or for --to-hf a resolved_config.yaml, of this stage in it), holds nothing but the files that its
resolved_config.yaml lists as written, and --overwrite is given; a directory this stage did not write is refused,
whatever the flags, before any work.

Commands (the same on CPU, CUDA and Trainium hosts; this stage needs no accelerator)
  python 03_convert_checkpoint.py --config config.yaml                      # TP 32, kv_replicator 4, trn1
  python 03_convert_checkpoint.py --config config.yaml --config demo.yaml --overwrite
  python 03_convert_checkpoint.py --config config.yaml --to-hf merged_hf/ --merge-adapter <run>/final/adapter
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import struct
import sys
from pathlib import Path

import torch
import yaml

# ------------------------------------------------------------------------------------------------ settings
STAGE = "03_convert_checkpoint.py"


# The config keys this stage reads, their types and ranges (validated before any work starts).
SCHEMA = {
    "model.hf_weights_dir": "path",
    "model.model_config": "path",
    "model.fuse_qkv": "bool",
    "exp_manager.resume_from_checkpoint": "path",
    "distributed_strategy.tensor_model_parallel_size": "int >= 1",
    "distributed_strategy.pipeline_model_parallel_size": "int >= 1",
    "distributed_strategy.kv_replicator": "int >= 1",
    "distributed_strategy.hw_backend": "trn1|trn2",
    "data.tokenizer.type": "path",
}


# ------------------------------------------------------------------------------------------------ inputs
def read_config(path):
    try:
        config = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise StageError(f"model.model_config: {path} not found (stage 02 writes it)") from None
    except (OSError, ValueError) as e:
        raise StageError(f"model.model_config: {path} is not a readable JSON file ({type(e).__name__})") from None
    family = config.get("model_type", "llama")
    arch = (config.get("architectures") or ["LlamaForCausalLM"])[0]
    # Mistral's tensors are Llama's: the layout and the conversion are the same
    if {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}.get(family) != arch:
        raise StageError(
            f"{path}: architecture {arch} (model_type {family}), expected LlamaForCausalLM or "
            f"MistralForCausalLM with its model_type"
        )
    return config


def weight_files(weights_dir):
    """{tensor name: safetensors file} from the index, or from the single *.safetensors file."""
    index = weights_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: weights_dir / f for name, f in weight_map.items()}
    files = sorted(weights_dir.glob("*.safetensors"))
    if not files and (weights_dir / "pytorch_model.bin").exists():
        return {
            name: weights_dir / "pytorch_model.bin"
            for name in TensorReader({}).torch_file(weights_dir / "pytorch_model.bin")
        }
    if len(files) != 1:
        raise StageError(
            f"model.hf_weights_dir: {weights_dir} needs model.safetensors.index.json, exactly one "
            f"*.safetensors file or a pytorch_model.bin (found {len(files)} safetensors files)"
        )
    _, header = TensorReader({}).header(files[0])
    return {name: files[0] for name in header if name != "__metadata__"}


SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class TensorSlicer:
    """Row or column ranges of one tensor inside a safetensors file.

    Rows are read with plain positioned reads. Columns (o_proj and down_proj, split along their inputs) are
    copied out of a memory map of the tensor that is closed again at once: only the pages holding the wanted
    columns are read (at TP 32 about one page in seven of a down_proj row, where reading whole rows read all
    seven), and no mapped page stays resident afterwards."""

    def __init__(self, path, fd, start, shape, dtype):
        self.path, self.fd, self.start, self.shape, self.dtype = path, fd, start, tuple(shape), dtype
        self.itemsize = torch.empty((), dtype=dtype).element_size()
        self.row_bytes = self.itemsize * (self.shape[1] if len(self.shape) > 1 else 1)

    def get_shape(self):
        return list(self.shape)

    def read(self, offset, nbytes):
        """nbytes from offset into a fresh uint8 tensor (torch.empty: not zero-filled first)."""
        data = torch.empty(nbytes, dtype=torch.uint8)
        view, done = memoryview(data.numpy()), 0
        while done < nbytes:
            n = os.preadv(self.fd, [view[done:]], self.start + offset + done)
            if n == 0:
                raise StageError(f"{self.path}: file ends inside a tensor (truncated?)")
            done += n
        return data

    def rows(self, a, b):
        if a == b:
            return torch.empty((0,) + self.shape[1:], dtype=self.dtype)
        return (
            self.read(a * self.row_bytes, (b - a) * self.row_bytes).view(self.dtype).reshape((b - a,) + self.shape[1:])
        )

    def columns(self, a, b):
        import mmap

        import numpy as np

        skip = self.start % mmap.ALLOCATIONGRANULARITY
        size = self.shape[0] * self.row_bytes  # within the file: TensorReader.header checked its length
        mapped = mmap.mmap(self.fd, skip + size, offset=self.start - skip, access=mmap.ACCESS_READ)
        try:
            whole = np.frombuffer(mapped, np.uint8, count=size, offset=skip).reshape(self.shape[0], self.row_bytes)
            out = whole[:, a * self.itemsize : b * self.itemsize].copy()  # a copy even when it is every column
            del whole  # the map can only close once no array looks into it
        finally:
            mapped.close()
        return torch.from_numpy(out).view(self.dtype)

    def __getitem__(self, key):
        if not isinstance(key, tuple):  # [a:b] rows
            return self.rows(key.start or 0, self.shape[0] if key.stop is None else key.stop)
        _, cols = key  # [:, a:b] columns
        return self.columns(cols.start, cols.stop)


class TorchSlice:
    """The slicer interface over a tensor already loaded (from pytorch_model.bin)."""

    def __init__(self, tensor):
        self.tensor = tensor

    def get_shape(self):
        return list(self.tensor.shape)

    def __getitem__(self, key):
        return self.tensor[key].clone()


class TensorReader:
    """Finds named tensors in safetensors files (headers parsed once per file) and hands out slicers. A
    single pytorch_model.bin is also accepted; it is memory-mapped by torch.load, so there the whole file can
    become resident (convert it to safetensors with stage 02 for large models)."""

    def __init__(self, files):
        self.files, self.headers, self.fds, self.torch_files = files, {}, {}, {}

    def torch_file(self, path):
        if path not in self.torch_files:
            self.torch_files[path] = load_torch_file(path)
        return self.torch_files[path]

    def header(self, path):
        if path not in self.headers:
            if not path.exists():
                raise StageError(f"{path}: shard named in the index is missing")
            try:
                fd = os.open(path, os.O_RDONLY)
                (n,) = struct.unpack("<Q", os.pread(fd, 8, 0))
                header = json.loads(os.pread(fd, n, 8))
                size = os.fstat(fd).st_size
            except (OSError, ValueError, struct.error) as e:
                raise StageError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None
            end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
            if 8 + n + end > size:
                raise StageError(
                    f"{path}: not a readable safetensors file (ends at byte {size}, its header "
                    f"needs {8 + n + end}: truncated?)"
                )
            self.headers[path], self.fds[path] = (8 + n, header), fd
        return self.headers[path]

    def slice(self, name):
        path = self.files.get(name)
        if path is None:
            raise StageError(f"HF checkpoint: tensor '{name}' missing")
        if path.suffix == ".bin":
            return TorchSlice(self.torch_file(path)[name])
        base, header = self.header(path)
        entry = header.get(name)
        if entry is None or entry.get("dtype") not in SAFETENSORS_DTYPES:
            raise StageError(f"{path}: tensor '{name}' is not in the file or has an unsupported dtype")
        return TensorSlicer(
            path, self.fds[path], base + entry["data_offsets"][0], entry["shape"], SAFETENSORS_DTYPES[entry["dtype"]]
        )


# ------------------------------------------------------------------------------------------------ shards
def pipeline_stages(arch, pp):
    """The layers of each pipeline stage: split evenly, the remainder on the later stages (as NxD's converter); the
    embedding goes to the first stage, the final norm and the output layer to the last."""
    if pp > arch.layers:
        raise StageError(f"pipeline_model_parallel_size {pp} exceeds the {arch.layers} layers")
    if arch.tie and pp > 1:
        raise StageError("tied embeddings with pipeline_model_parallel_size > 1 are not supported")
    base, extra = divmod(arch.layers, pp)
    sizes = [base + (stage >= pp - extra) for stage in range(pp)]
    starts = [sum(sizes[:stage]) for stage in range(pp)]
    return [range(first, first + n) for first, n in zip(starts, sizes)]


def head_rows(heads, hd):
    """Row ranges (start, end) covering the given heads, merged where they are consecutive."""
    runs = []
    for h in heads:
        if runs and runs[-1][1] == h * hd:
            runs[-1][1] += hd
        else:
            runs.append([h * hd, (h + 1) * hd])
    return runs


def take(reader, name, shape, runs, dim=0):
    """Rows (dim 0) or columns (dim 1) of a tensor given as ranges, checking its full shape first."""
    sl = reader.slice(name)
    if tuple(sl.get_shape()) != shape:
        raise StageError(
            f"HF checkpoint: tensor '{name}' has shape {list(sl.get_shape())}, config.json implies {list(shape)}"
        )
    parts = [sl[a:b] if dim == 0 else sl[:, a:b] for a, b in runs]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


def nxdt_shard(layout, stages, reader, r, stage, fuse_qkv):
    """The {name: tensor} of one output shard, read slice by slice."""
    L, A, h = layout, layout.arch, layout.arch.hidden
    out = {}
    if stage == 0:
        out["model.embed_tokens.weight"] = take(reader, "model.embed_tokens.weight", (A.vocab, h), [L.part(A.vocab, r)])
    q_heads, kv_heads = L.heads(r)
    q_runs, kv_runs = head_rows(q_heads, A.head_dim), head_rows(kv_heads, A.head_dim)
    for i in stages[stage]:
        p = f"model.layers.{i}."
        q = take(reader, p + "self_attn.q_proj.weight", (A.heads * A.head_dim, h), q_runs)
        k = take(reader, p + "self_attn.k_proj.weight", (A.kv_heads * A.head_dim, h), kv_runs)
        v = take(reader, p + "self_attn.v_proj.weight", (A.kv_heads * A.head_dim, h), kv_runs)
        if fuse_qkv:
            out[p + "self_attn.qkv_proj.weight_qkv"] = torch.cat([q, k, v])
        else:
            out.update(
                {
                    p + "self_attn.qkv_proj.weight_q": q,
                    p + "self_attn.qkv_proj.weight_k": k,
                    p + "self_attn.qkv_proj.weight_v": v,
                }
            )
        out[p + "self_attn.o_proj.weight"] = take(
            reader, p + "self_attn.o_proj.weight", (h, A.heads * A.head_dim), q_runs, dim=1
        )
        rows = [L.part(A.inter, r)]
        out[p + "mlp.gate_up_proj.weight"] = torch.cat(
            [
                take(reader, p + "mlp.gate_proj.weight", (A.inter, h), rows),
                take(reader, p + "mlp.up_proj.weight", (A.inter, h), rows),
            ]
        )
        out[p + "mlp.down_proj.weight"] = take(reader, p + "mlp.down_proj.weight", (h, A.inter), rows, dim=1)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            out[p + norm + ".weight"] = take(reader, p + norm + ".weight", (h,), [(0, h)])
    if stage == len(stages) - 1:
        out["model.norm.weight"] = take(reader, "model.norm.weight", (h,), [(0, h)])
        if not A.tie:
            out["lm_head.weight"] = take(reader, "lm_head.weight", (A.vocab, h), [L.part(A.vocab, r)])
    return out


def hf_names(config):
    """The HF tensor names a Llama with this config has; any other name in the checkpoint is an error."""
    names = {"model.embed_tokens.weight", "model.norm.weight"}
    if not config.get("tie_word_embeddings", False):
        names.add("lm_head.weight")
    for i in range(config["num_hidden_layers"]):
        for leaf in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
            "input_layernorm",
            "post_attention_layernorm",
        ):
            names.add(f"model.layers.{i}.{leaf}.weight")
    return names


def shard_name(r, stage):
    return f"dp_rank_00_tp_rank_{r:02d}_pp_rank_{stage:02d}.pt"


# ------------------------------------------------------------------------------------------------ reverse
def load_shards(layout, pp, model_dir, fuse_qkv):
    """{(rank, stage): state} of every shard, memory-mapped; a missing or unreadable file is an error."""
    shards, hd = {}, layout.arch.head_dim
    for stage in range(pp):
        for r in range(layout.tp):
            path = model_dir / shard_name(r, stage)
            if not path.exists():
                raise StageError(f"{path}: shard missing (TP {layout.tp} x PP {pp} expected)")
            try:
                state = load_torch_file(path)
            except Exception as e:
                raise StageError(f"{path}: not a readable torch checkpoint ({type(e).__name__}: {e})") from None
            if fuse_qkv:
                for name in [n for n in state if n.endswith("qkv_proj.weight_qkv")]:
                    q_heads, kv_heads = layout.heads(r)
                    q, k, v = state.pop(name).split([len(q_heads) * hd, len(kv_heads) * hd, len(kv_heads) * hd])
                    base = name[: -len("weight_qkv")]
                    state.update({base + "weight_q": q, base + "weight_k": k, base + "weight_v": v})
            shards[(r, stage)] = state
    return shards


def hf_tensors(layout, stages, shards):
    """Reassemble HF tensors from NxDT shards: inverse head permutation, one copy of each replicated KV head
    (the copies must agree), gate/up split, pipeline stages merged."""
    L, A, hd, last = layout, layout.arch, layout.arch.head_dim, len(stages) - 1

    def get(r, stage, name):
        state = shards[(r, stage)]
        if name not in state:
            raise StageError(f"{shard_name(r, stage)}: tensor '{name}' missing")
        return state[name]

    def by_heads(stage, name, heads_of, n_heads, dim=0):
        full = None
        for r in range(L.tp):
            t = get(r, stage, name)
            blocks = t.split(hd, dim=dim)
            if full is None:
                shape = list(t.shape)
                shape[dim] = n_heads * hd
                full, seen = torch.empty(shape, dtype=t.dtype), {}
            for head, block in zip(heads_of(r), blocks):
                if head in seen:
                    if not torch.equal(seen[head], block):
                        raise StageError(
                            f"{shard_name(r, stage)}: replicated KV head {head} of '{name}' differs "
                            f"from its copy on another rank"
                        )
                    continue
                seen[head] = block
                full.narrow(dim, head * hd, hd).copy_(block)
        return full

    def cat(stage, name, dim):
        return torch.cat([get(r, stage, name) for r in range(L.tp)], dim=dim)

    yield "model.embed_tokens.weight", cat(0, "model.embed_tokens.weight", 0)
    q_of, kv_of = (lambda r: L.heads(r)[0]), (lambda r: L.heads(r)[1])
    for stage, layers in enumerate(stages):
        for i in layers:
            p = f"model.layers.{i}."
            yield p + "self_attn.q_proj.weight", by_heads(stage, p + "self_attn.qkv_proj.weight_q", q_of, A.heads)
            yield p + "self_attn.k_proj.weight", by_heads(stage, p + "self_attn.qkv_proj.weight_k", kv_of, A.kv_heads)
            yield p + "self_attn.v_proj.weight", by_heads(stage, p + "self_attn.qkv_proj.weight_v", kv_of, A.kv_heads)
            yield p + "self_attn.o_proj.weight", by_heads(stage, p + "self_attn.o_proj.weight", q_of, A.heads, 1)
            halves = [get(r, stage, p + "mlp.gate_up_proj.weight").chunk(2) for r in range(L.tp)]
            yield p + "mlp.gate_proj.weight", torch.cat([g for g, _ in halves])
            yield p + "mlp.up_proj.weight", torch.cat([u for _, u in halves])
            yield p + "mlp.down_proj.weight", cat(stage, p + "mlp.down_proj.weight", 1)
            for norm in ("input_layernorm", "post_attention_layernorm"):
                yield p + norm + ".weight", get(0, stage, p + norm + ".weight")
    yield "model.norm.weight", get(0, last, "model.norm.weight")
    if not A.tie:
        yield "lm_head.weight", cat(last, "lm_head.weight", 0)


def merge_adapter(state, adapter_dir):
    """Add a PEFT LoRA adapter into the HF tensors: W += scale B A (scale alpha / r, or alpha / sqrt(r) with
    use_rslora); with DoRA (use_dora) W = m / ||W + scale B A|| (W + scale B A), the norm of each output row, m the
    adapter's magnitude of that row. Computed in fp32 and cast back to W's dtype (merging in bf16 loses the small
    updates). Every adapter tensor must match a weight."""
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    try:
        acfg = json.loads((adapter_dir / "adapter_config.json").read_text())
        tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    except FileNotFoundError as e:
        raise StageError(
            f"--merge-adapter: {e.filename} not found (a PEFT adapter directory holds "
            f"adapter_config.json and adapter_model.safetensors)"
        ) from None
    if acfg.get("peft_type") != "LORA":
        raise StageError(f"{adapter_dir}/adapter_config.json: peft_type {acfg.get('peft_type')!r}, expected 'LORA'")
    r = acfg["r"]
    scaling = acfg["lora_alpha"] / (math.sqrt(r) if acfg.get("use_rslora") else r)
    prefix = "base_model.model."
    modules = sorted({k[len(prefix) :].rsplit(".lora_", 1)[0] for k in tensors if ".lora_" in k})
    extra = [k for k in tensors if ".lora_" not in k or not k.startswith(prefix)]
    if extra:
        raise StageError(f"{adapter_dir}: tensor '{extra[0]}' is not a LoRA weight this stage can merge")
    for module in modules:
        weight = module + ".weight"
        if weight not in state:
            raise StageError(f"{adapter_dir}: adapter for '{module}', which the model does not have")
        a = tensors[f"{prefix}{module}.lora_A.weight"].float()
        b = tensors[f"{prefix}{module}.lora_B.weight"].float()
        w = state[weight]
        if (b.shape[0], a.shape[1]) != tuple(w.shape) or a.shape[0] != r or b.shape[1] != r:
            raise StageError(
                f"{adapter_dir}: LoRA shapes A {list(a.shape)}, B {list(b.shape)} do not fit "
                f"'{weight}' {list(w.shape)} with r = {r}"
            )
        merged = w.float() + scaling * (b @ a)
        if acfg.get("use_dora"):
            magnitude = tensors.get(f"{prefix}{module}.lora_magnitude_vector")
            if magnitude is None or tuple(magnitude.shape) != (w.shape[0],):
                raise StageError(
                    f"{adapter_dir}: a DoRA adapter needs '{module}.lora_magnitude_vector' of {w.shape[0]}"
                )
            merged = merged * (magnitude.float() / merged.norm(dim=1))[:, None]
        state[weight] = merged.to(w.dtype)
    return len(modules)


# ------------------------------------------------------------------------------------------------ outputs
def check_output(out, key, overwrite):
    """Pre-flight for an output directory: it can be written; an existing non-empty one is replaced only when it
    is an earlier output of this stage (its resolved_config.yaml says so) and --overwrite is given."""
    if out.exists() and not out.is_dir():
        raise StageError(f"{key}: {out} is a file; this stage writes a directory there")
    if out.is_dir() and any(out.iterdir()):
        if not written_by_this_stage(out / "resolved_config.yaml"):
            refuse_foreign(out, key, "no resolved_config.yaml of this stage in it")
        if not overwrite:
            raise StageError(f"{key}: {out} holds an earlier output of this stage; pass --overwrite to replace it")
        if unrecorded(out):
            raise StageError(
                f"{key}: {out} holds {', '.join(unrecorded(out))} beside what 03 wrote there; replacing its output "
                f"would delete them, so nothing is done: move them out of it, or choose another directory"
            )
    check_writable(out, key)


# ------------------------------------------------------------------------------------------------ manifest
def describe(state):
    return {name: {"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")} for name, t in state.items()}


def settings_of(c):
    return {
        "tensor_model_parallel_size": c["distributed_strategy.tensor_model_parallel_size"],
        "pipeline_model_parallel_size": c["distributed_strategy.pipeline_model_parallel_size"],
        "kv_replicator": c["distributed_strategy.kv_replicator"],
        "hw_backend": c["distributed_strategy.hw_backend"],
        "fuse_qkv": c["model.fuse_qkv"],
    }


def verify(ckpt, c):
    """Check a converted checkpoint against its manifest.json: layout settings, files, sizes, sha256, and every
    tensor's name, shape and dtype. Returns the number of files checked."""
    path = ckpt / "manifest.json"
    if not path.exists():
        raise StageError(f"{path} not found (written by this stage when it converts)")
    manifest = json.loads(path.read_text())
    for key, value in settings_of(c).items():
        if manifest["settings"][key] != value:
            raise StageError(f"{ckpt}: converted with {key} = {manifest['settings'][key]}, the config says {value}")
    for rel, entry in manifest["files"].items():
        f = ckpt / rel
        if not f.exists():
            raise StageError(f"{f}: missing")
        if f.stat().st_size != entry["bytes"]:
            raise StageError(f"{f}: {f.stat().st_size} bytes, the manifest says {entry['bytes']} (truncated?)")
        if file_sha256(f) != entry["sha256"]:
            raise StageError(f"{f}: sha256 differs from the manifest (the file changed after conversion)")
        try:
            found = describe(load_torch_file(f))
        except Exception as e:
            raise StageError(f"{f}: not a readable torch checkpoint ({type(e).__name__}: {e})") from None
        if found != entry["tensors"]:
            diff = [n for n in sorted(set(found) | set(entry["tensors"])) if found.get(n) != entry["tensors"].get(n)]
            raise StageError(f"{f}: tensor '{diff[0]}' differs from the manifest")
    return len(manifest["files"])


# ------------------------------------------------------------------------------------------------ main
def parse_args(argv):
    ap = config_arg_parser(__doc__)
    ap.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier output of this stage (a directory it did not write is never replaced)",
    )
    ap.add_argument(
        "--to-hf",
        metavar="DIR",
        help="reverse direction: reassemble the NxDT checkpoint at "
        "exp_manager.resume_from_checkpoint into an HF safetensors directory DIR",
    )
    ap.add_argument(
        "--verify",
        action="store_true",
        help="check the checkpoint at exp_manager.resume_from_checkpoint against its manifest.json, then exit",
    )
    ap.add_argument("--tp", type=int, help="tensor_model_parallel_size (overrides the config)")
    ap.add_argument("--pp", type=int, help="pipeline_model_parallel_size (overrides the config)")
    ap.add_argument("--kv-replicator", type=int, help="kv_replicator (overrides the config)")
    ap.add_argument("--hw-backend", choices=["trn1", "trn2"], help="head layout (overrides the config)")
    ap.add_argument("--fuse-qkv", action=argparse.BooleanOptionalAction, help="one weight_qkv per rank, or not")
    ap.add_argument(
        "--merge-adapter",
        metavar="ADAPTER_DIR",
        help="with --to-hf: merge this PEFT LoRA adapter (e.g. <run dir>/final/adapter) into the weights",
    )
    args = ap.parse_intermixed_args(argv)
    if args.merge_adapter and not args.to_hf:
        raise StageError("--merge-adapter needs --to-hf DIR")
    return args


def settings(args):
    """The resolved config, the layout flags applied over it, printed."""
    flags = {
        "distributed_strategy.tensor_model_parallel_size": args.tp,
        "distributed_strategy.pipeline_model_parallel_size": args.pp,
        "distributed_strategy.kv_replicator": args.kv_replicator,
        "distributed_strategy.hw_backend": args.hw_backend,
        "model.fuse_qkv": args.fuse_qkv,
    }
    overrides = args.overrides + [f"{k}={json.dumps(v)}" for k, v in flags.items() if v is not None]
    paths = args.config or ["config.yaml"]
    c = resolve(load_config(paths, overrides), SCHEMA)
    show_settings(c, paths, overrides, SCHEMA)
    return c


class HashingFile:
    """A file being written that hashes its bytes on their way to the disk, so the manifest's sha256 costs no
    second read."""

    def __init__(self, f):
        import hashlib

        self.f, self.sha256 = f, hashlib.sha256()

    def write(self, data):
        self.sha256.update(data)
        return self.f.write(data)

    def flush(self):
        self.f.flush()


def convert(c, config, layout, stages, ckpt):
    """HF safetensors -> the NxDT checkpoint: one output shard at a time, each read slice by slice."""
    weights_dir = Path(c["model.hf_weights_dir"])
    if not weights_dir.is_dir():
        raise StageError(f"model.hf_weights_dir: {weights_dir} not found (stage 02 writes it)")
    files = weight_files(weights_dir)
    # Tied models may still carry a redundant lm_head copy; it is the embedding, so it is not written.
    unknown = sorted(set(files) - hf_names(config) - {"lm_head.weight"})
    if unknown:
        raise StageError(
            f"HF checkpoint: unexpected tensor '{unknown[0]}' ({len(unknown)} in all); "
            f"is {weights_dir} a Llama model matching {c['model.model_config']}?"
        )
    tmp = staging(ckpt)
    (tmp / "model").mkdir()
    reader, total, entries = TensorReader(files), 0, {}
    try:
        for stage in range(len(stages)):
            for r in range(layout.tp):
                shard = nxdt_shard(layout, stages, reader, r, stage, c["model.fuse_qkv"])
                path = tmp / "model" / shard_name(r, stage)
                with open(path, "wb") as f:
                    out = HashingFile(f)
                    torch.save(shard, out)
                total += sum(t.numel() * t.element_size() for t in shard.values())
                entries[f"model/{path.name}"] = {
                    "bytes": path.stat().st_size,
                    "sha256": out.sha256.hexdigest(),
                    "tensors": describe(shard),
                }
                del shard
        manifest = {"source": str(weights_dir), "settings": settings_of(c), "files": entries}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
        save_config(c, tmp / "resolved_config.yaml", files_of(tmp))
        publish(tmp, ckpt)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(
        f"wrote {ckpt / 'model'}: {layout.tp * len(stages)} shard(s) (TP {layout.tp} x PP {len(stages)}), "
        f"{total / 2**20:.1f} MiB"
    )


def to_hf(c, config, layout, stages, ckpt, out, adapter):
    """The NxDT checkpoint -> an HF safetensors directory (with the tokenizer), a LoRA adapter merged if given."""
    tmp = staging(out)
    try:
        shards = load_shards(layout, len(stages), ckpt / "model", c["model.fuse_qkv"])
        state = dict(hf_tensors(layout, stages, shards))
        if adapter:
            print(f"merged {merge_adapter(state, adapter)} LoRA modules from {adapter}")
        save_sharded(state, tmp)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        tokenizer = Path(c["data.tokenizer.type"])
        for f in sorted(tokenizer.glob("*")) if tokenizer.is_dir() else []:
            if f.is_file():
                shutil.copy2(f, tmp / f.name)
        save_config(c, tmp / "resolved_config.yaml", files_of(tmp))
        publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"wrote {out}: {len(state)} tensors (HF layout)")


def main(argv=None):
    args = parse_args(argv)
    c = settings(args)
    config = read_config(c["model.model_config"])
    try:
        arch = arch_of(config)
    except KeyError as e:
        raise StageError(f"{c['model.model_config']}: missing key {e}") from None
    layout = Layout(
        arch,
        c["distributed_strategy.tensor_model_parallel_size"],
        c["distributed_strategy.kv_replicator"],
        c["distributed_strategy.hw_backend"],
    ).check()
    stages = pipeline_stages(arch, c["distributed_strategy.pipeline_model_parallel_size"])
    ckpt = Path(c["exp_manager.resume_from_checkpoint"])
    if args.verify:
        print(f"{ckpt}: {verify(ckpt, c)} file(s) match manifest.json (sizes, sha256, tensor names, shapes, dtypes)")
    elif args.to_hf:
        out = Path(args.to_hf)
        if not (ckpt / "model").is_dir():
            raise StageError(f"exp_manager.resume_from_checkpoint: {ckpt / 'model'} not found (converting writes it)")
        if args.merge_adapter and not (Path(args.merge_adapter) / "adapter_config.json").is_file():
            raise StageError(
                f"--merge-adapter: {args.merge_adapter} holds no adapter_config.json (a PEFT adapter "
                f"directory, e.g. <run dir>/final/adapter)"
            )
        check_output(out, "--to-hf", args.overwrite)
        to_hf(c, config, layout, stages, ckpt, out, args.merge_adapter)
    else:
        check_output(ckpt, "exp_manager.resume_from_checkpoint", args.overwrite)
        convert(c, config, layout, stages, ckpt)


# ------------------------------------------------------------------------------------------------ layout
# The model's architecture and how NxD lays it out over tensor-parallel ranks, repeated in stages 03 and 05 (the
# same text, tests/test_config.py): 03 writes each rank's shard by this layout, 05 builds each rank's model from it
# and reassembles the adapter with it, so no index ever travels between ranks.
@dataclasses.dataclass(frozen=True)
class Arch:
    """A Llama-family architecture, from an HF config.json (arch_of)."""

    vocab: int
    hidden: int
    inter: int  # the MLP's intermediate size
    layers: int
    heads: int  # query heads
    kv_heads: int
    head_dim: int
    eps: float = 1e-6  # RMSNorm
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # Llama 3.1's "llama3" frequency scaling
    tie: bool = False  # output layer tied to the embedding
    sliding_window: int | None = None  # Mistral only


def arch_of(raw):
    """The Arch of an HF config.json (as a dict; old and new rope key styles). KeyError names a missing key."""
    heads = raw["num_attention_heads"]
    rope = dict(raw.get("rope_parameters") or {})
    return Arch(
        vocab=raw["vocab_size"],
        hidden=raw["hidden_size"],
        inter=raw["intermediate_size"],
        layers=raw["num_hidden_layers"],
        heads=heads,
        kv_heads=raw.get("num_key_value_heads") or heads,
        head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
        eps=raw.get("rms_norm_eps", 1e-6),
        rope_theta=raw.get("rope_theta") or rope.get("rope_theta", 10000.0),
        rope_scaling=raw.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None),
        tie=bool(raw.get("tie_word_embeddings", False)),
        sliding_window=raw.get("sliding_window") if raw.get("model_type") == "mistral" else None,
    )


class Layout:
    """Which heads, and so which rows of every weight, each tensor-parallel rank holds, as NxD's converter lays a
    checkpoint out (--qkv_linear, --hw_backend). Column-parallel weights (embedding, q/k/v, gate/up, output layer)
    are split by rows, row-parallel ones (o_proj, down_proj) by input columns, norms replicated. KV heads are
    copied kv_mult times (kv_replicator), then split: on trn1 tiled (K0..K7, K0..K7, ...), rank r holding the Q
    head group (r % kv) * (tp / kv) + r // kv, which belongs to its KV head r % kv; on trn2 each head's copies on
    adjacent ranks (K0, K0, ..., K1, K1, ...), with Q heads in order."""

    def __init__(self, arch, tp=1, kv_mult=1, hw_backend="trn1"):
        self.arch, self.tp, self.kv_mult, self.hw_backend = arch, tp, kv_mult, hw_backend

    def heads(self, r):
        """(Q heads, KV heads) of tensor-parallel rank r."""
        heads, kv, tp, m = self.arch.heads, self.arch.kv_heads, self.tp, self.kv_mult
        per_q, per_kv = heads // tp, kv * m // tp
        group = (r % kv) * (tp // kv) + r // kv if self.hw_backend == "trn1" and m > 1 else r
        copies = range(r * per_kv, (r + 1) * per_kv)  # positions in the list of KV heads with their copies
        kv_heads = [t // m if self.hw_backend == "trn2" else t % kv for t in copies]
        return list(range(group * per_q, (group + 1) * per_q)), kv_heads

    def part(self, n, r):
        """(first, end) of rank r's share of n rows split evenly."""
        return r * n // self.tp, (r + 1) * n // self.tp

    def check(self):
        """The layout exists: TP divides every split dimension, and on trn1 with copies the copies fill TP."""
        arch, tp, m = self.arch, self.tp, self.kv_mult
        checks = [
            ("num_attention_heads", arch.heads),
            ("num_key_value_heads x kv_replicator", arch.kv_heads * m),
            ("intermediate_size", arch.inter),
            ("vocab_size", arch.vocab),
        ]
        bad = [f"{what} ({n})" for what, n in checks if n % tp]
        if bad:
            raise StageError(f"distributed_strategy.tensor_model_parallel_size {tp} does not divide {', '.join(bad)}")
        if m > 1 and self.hw_backend == "trn1" and arch.kv_heads * m != tp:
            raise StageError(
                f"with kv_replicator > 1, num_key_value_heads x kv_replicator ({arch.kv_heads * m}) must equal "
                f"tensor_model_parallel_size ({tp}) on trn1"
            )
        return self

    def check_trainable(self):
        """What grouped-query attention needs beyond check(): at least as many Q heads as KV heads on every rank.
        (Then each local Q head's KV head is local, on trn1 and trn2: tests/test_parallel.py checks it over a grid
        of models and layouts.)"""
        q, kv = self.heads(0)
        if len(q) % len(kv):
            raise StageError(
                f"with tensor_model_parallel_size {self.tp} and kv_replicator {self.kv_mult}, each rank would hold "
                f"{len(q)} Q heads and {len(kv)} KV heads; each KV head needs its own Q heads (lower kv_replicator "
                f"to at most num_attention_heads / num_key_value_heads)"
            )
        return self

    def kv_groups(self):
        """Tensor-parallel ranks grouped by the KV heads they hold (copies of a head sit in one group)."""
        groups = {}
        for r in range(self.tp):
            groups.setdefault(tuple(self.heads(r)[1]), []).append(r)
        return list(groups.values())


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


def file_sha256(path):
    """Hex sha256 of a file, read in 16 MiB blocks."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


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
