#!/usr/bin/env python3
"""Stage 01: fetch the SFT data, validate every record and write the jsonl files that 05 reads.

Sources (data.download.train_uri / val_uri)
  s3://bucket/key           one object; s3://bucket/prefix/ downloads every object under the prefix (keys that
                            would escape the destination, with .. or a leading /, are refused). Anonymous by
                            default (unsigned, like `aws s3 cp --no-sign-request`); data.download.anonymous:
                            false uses the standard AWS credential chain or data.download.profile.
                            AWS_ENDPOINT_URL, data.download.endpoint_url and data.download.region are honoured.
                            Objects arrive in concurrent ranged parts (part_size_mb, workers); an interrupted
                            download resumes with the parts it lacks; size and ETag are verified.
  https://... or http://... streamed with retries; an interrupted transfer continues with a Range request
  hf://datasets/owner/name[:split]   through `datasets` (default split: train)
  a local path (or file://...)

Records
  Each line must be a JSON object with string "input" and "output" (other fields are kept). Raw
  databricks-dolly records (instruction, context, response) are converted the NeMo way: input = instruction,
  followed by a blank line and the context when there is one; output = response. A bad line is reported as
  file:line with the reason; data.download.bad_lines decides whether the stage stops (fail) or skips and counts
  it (skip). Blank lines are ignored.

Outputs
  data.train_dir, data.val_dir   validated jsonl (each key names a file, despite "dir"), written under a
                                  temporary name and renamed
  <file>.manifest.json            source and its identity (ETag/size or sha256), sha256 of every object and of
                                  the output, record counts, rejected lines with reasons, duplicates, token
                                  length statistics (when data.tokenizer.type exists already), resolved config
  A re-run whose source and output are unchanged (checked by ETag or checksum) does nothing and says so; a
  changed source replaces the earlier output. An existing path that 01 did not write (no manifest beside it: a
  directory, the source itself, a file of yours) is refused before anything is downloaded, and left as it is.

Main keys
  data.download.train_uri, data.download.val_uri   sources
  data.download.anonymous, .endpoint_url, .region, .profile   S3 access
  data.download.bad_lines                         fail | skip
  data.train_dir, data.val_dir                    outputs

Commands (the same on CPU, CUDA and Trainium hosts)
  python 01_download_data.py --config config.yaml
  python 01_download_data.py --config config.yaml --config demo.yaml
"""

import argparse
import contextlib
import errno
import hashlib
import json
import os
import shutil
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import yaml

# ------------------------------------------------------------------------------------------------ shared
# These helpers are repeated, identical, at the top of every stage so that each stage can be copied alone
# (tests/test_config.py keeps them identical); a stage may carry some it does not call. STAGE (the stage's file
# name) is defined by each stage in its settings section.


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
    """{dotted key: value} for the keys this stage reads, each checked against its type and range; paths
    expanded.

    A spec is a type, optionally followed by a range. Types: int, float, bool, str, path (str with ~ and ${ENV}
    expanded), list[str], list[float], a|b|c (one of these strings); a trailing ? also allows null. Ranges:
    '>= 1', '> 0', 'in [0, 1)' (brackets as in mathematics), checked for numbers and for every item of a list.
    """
    out = {}
    for key, spec in schema.items():
        node = cfg
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                raise StageError(f"config: missing key '{key}' (expected {spec})")
            node = node[part]
        kind, _, bounds = spec.partition(" ")
        nullable, kind = kind.endswith("?"), kind.rstrip("?")
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
    """x satisfies a range of the schema: '>= a', '> a' or 'in [a, b)' with either bracket at either end."""
    if bounds.startswith(">"):
        op, limit = bounds.split()
        return x >= float(limit) if op == ">=" else x > float(limit)
    lo, hi = bounds.removeprefix("in ").split(", ")
    return ((x >= float(lo[1:]) if lo[0] == "[" else x > float(lo[1:]))
            and (x <= float(hi[:-1]) if hi[-1] == "]" else x < float(hi[:-1])))


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
    shown = lambda v: (f"[{', '.join(map(shown, v))}]" if isinstance(v, list)  # noqa: E731  (as YAML reads it)
                       else v if isinstance(v, str) else json.dumps(v))
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


def save_config(c, path):
    """Write the resolved config (nested YAML, secrets masked) next to an output, atomically. Its first line
    names the stage, which is how a stage recognises an output as its own (written_by_this_stage)."""
    nested = {}
    for key, value in redacted(c).items():
        *parents, leaf = key.split(".")
        node = nested
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    write_atomically(path, f"# written by {STAGE}: the resolved config of this output\n"
                           + yaml.safe_dump(nested, sort_keys=False))


def written_by_this_stage(config_path):
    """True when `config_path` is a resolved config that this stage saved (see save_config)."""
    try:
        with open(config_path, encoding="utf-8") as f:
            return f.readline().startswith(f"# written by {STAGE}:")
    except (OSError, UnicodeDecodeError):
        return False


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
    ap.add_argument("--config", action="append", metavar="PATH",
                    help="YAML config; repeat to overlay (default: config.yaml)")
    ap.add_argument("overrides", nargs="*", metavar="dotted.key=value", help="config overrides (before or after "
                    "the options)")
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
    raise StageError(f"{key}: {path} exists and was not written by {STAGE} ({reason}); it is left as it is: move "
                     f"it away or choose another path")


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
    write_atomically(out_dir / "model.safetensors.index.json",
                     json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")


# ------------------------------------------------------------------------------------------------ settings
STAGE = "01_download_data.py"
# The config keys this stage reads, their types and ranges (validated before any work starts).
SCHEMA = {
    "data.download.train_uri": "str",
    "data.download.val_uri": "str?",
    "data.download.anonymous": "bool",
    "data.download.bad_lines": "fail|skip",
    "data.download.endpoint_url": "str?",
    "data.download.region": "str?",
    "data.download.profile": "str?",
    "data.download.part_size_mb": "int >= 1",
    "data.download.workers": "int >= 1",
    "data.train_dir": "path",
    "data.val_dir": "path?",
    "data.tokenizer.type": "path",
}


# ------------------------------------------------------------------------------------------------ fetch
def s3_client(c):
    """boto3 S3 client: unsigned requests when anonymous, else the standard credential chain (or a profile).
    AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3 are honoured by botocore itself; endpoint_url overrides them."""
    import boto3
    from botocore import UNSIGNED
    from botocore.config import Config

    config = Config(signature_version=UNSIGNED if c["data.download.anonymous"] else None,
                    retries={"mode": "standard", "max_attempts": 8}, region_name=c["data.download.region"],
                    max_pool_connections=max(10, c["data.download.workers"]))
    session = boto3.Session(profile_name=c["data.download.profile"])
    return session.client("s3", endpoint_url=c["data.download.endpoint_url"], config=config)


def s3_failure(client, error, uri, bucket):
    """A one-line StageError saying what went wrong with an S3 request and how to fix it."""
    from botocore.exceptions import ClientError, EndpointConnectionError, FlexibleChecksumError, NoCredentialsError

    if isinstance(error, FlexibleChecksumError):  # the object's stored checksum, checked by botocore per response
        return StageError(f"{uri}: a part arrived corrupted (its checksum does not match the object's: {error}); "
                          f"it was not kept, run the stage again")
    if isinstance(error, NoCredentialsError):
        return StageError(f"{uri}: no AWS credentials found (data.download.anonymous is false); configure a "
                          f"profile (data.download.profile) or AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY")
    if isinstance(error, EndpointConnectionError):
        return StageError(f"{uri}: cannot reach the S3 endpoint ({error.kwargs.get('endpoint_url')}); check the "
                          f"network, data.download.endpoint_url and AWS_ENDPOINT_URL")
    if not isinstance(error, ClientError):
        return StageError(f"{uri}: {type(error).__name__}: {error}")
    code = error.response.get("Error", {}).get("Code", "")
    if code in ("403", "AccessDenied", "Forbidden"):
        return StageError(f"{uri}: access denied; this object needs credentials: set data.download.anonymous: "
                          f"false and provide AWS credentials")
    if code in ("404", "NoSuchKey", "NotFound", "NoSuchBucket"):
        try:
            client.head_bucket(Bucket=bucket)
        except Exception as e:  # a private bucket answers 403 here, which still means it exists
            if getattr(e, "response", {}).get("Error", {}).get("Code") in ("404", "NoSuchBucket"):
                return StageError(f"{uri}: no such bucket '{bucket}'")
        return StageError(f"{uri}: no such object")
    if code in ("412", "PreconditionFailed"):
        return StageError(f"{uri}: the object changed while it was downloading; run the stage again")
    return StageError(f"{uri}: S3 error {code}: {error.response.get('Error', {}).get('Message', '')}")


@contextlib.contextmanager
def writing(path):
    """Turn a failed write into a one-line error naming the file (disk full, permissions)."""
    try:
        yield
    except OSError as e:
        reason = "disk full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
        raise StageError(f"writing {path} failed: {reason}") from None


def s3_head(client, bucket, key):
    """(size, ETag as S3 quotes it) of an object, or a StageError saying what is wrong."""
    try:
        head = client.head_object(Bucket=bucket, Key=key)
    except Exception as e:
        raise s3_failure(client, e, f"s3://{bucket}/{key}", bucket) from None
    return head["ContentLength"], head["ETag"]


def multipart_etag_matches(path, etag, size, part_sizes):
    """S3's ETag of a multipart upload is md5(md5(part 1) + ... + md5(part N)) + '-N'; check it for the part
    sizes the uploader may have used (the object does not record which)."""
    n = int(etag.rsplit("-", 1)[1])
    for part in sorted(set(part_sizes)):
        if -(-size // part) != n:
            continue
        digests = b""
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(part), b""):
                digests += hashlib.md5(block).digest()
        if f"{hashlib.md5(digests).hexdigest()}-{n}" == etag:
            return True
    return False


def uploaded_part_size(client, bucket, key):
    """The size of the object's first uploaded part (HEAD with PartNumber=1), or None where the store does not
    say: with it, a multipart ETag can always be checked, so a mismatch means the bytes are wrong."""
    try:
        return client.head_object(Bucket=bucket, Key=key, PartNumber=1)["ContentLength"]
    except Exception:  # not every S3-compatible store answers part-number requests
        return None


def download_s3_object(client, bucket, key, dest, c):
    """Download one object in concurrent ranged parts into dest, resumably; returns its identity.

    Progress is kept in <dest>.state.json (ETag, size, part size, finished parts) next to a preallocated
    <dest>.partial, so an interrupted run fetches only the parts it lacks. The object is verified by size and
    ETag (MD5 for single-part uploads, the multipart formula otherwise) before it is renamed into place."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    uri = f"s3://{bucket}/{key}"
    size, quoted_etag = s3_head(client, bucket, key)
    etag = quoted_etag.strip('"')
    part = c["data.download.part_size_mb"] * 2**20
    n_parts = max(1, -(-size // part))
    state_path, partial = dest.with_name(dest.name + ".state.json"), dest.with_name(dest.name + ".partial")
    state = json.loads(state_path.read_text()) if state_path.exists() and partial.exists() else None
    if state and (state["etag"], state["size"], state["part_size"]) == (etag, size, part):
        print(f"{uri}: resuming, {len(state['done'])} of {n_parts} parts already downloaded")
    else:
        state = {"etag": etag, "size": size, "part_size": part, "done": []}
        with writing(partial), open(partial, "wb") as f:
            f.truncate(size)
    done, lock = set(state["done"]), threading.Lock()
    bar = tqdm(total=size, initial=min(size, len(done) * part), unit="B", unit_scale=True, desc=key, leave=False,
               file=sys.stdout)
    fd = os.open(partial, os.O_RDWR)

    def fetch_part(i):
        first, last = i * part, min(size, (i + 1) * part) - 1
        try:
            body = client.get_object(Bucket=bucket, Key=key, Range=f"bytes={first}-{last}",
                                     IfMatch=quoted_etag)["Body"].read()
        except Exception as e:
            raise s3_failure(client, e, uri, bucket) from None
        if len(body) != last - first + 1:
            raise StageError(f"{uri}: part {i} came back with {len(body)} bytes, expected {last - first + 1}")
        with writing(partial):
            os.pwrite(fd, body, first)
        with lock:  # the state names a part only once its bytes are in the file
            done.add(i)
            state["done"] = sorted(done)
            write_atomically(state_path, json.dumps(state))
            bar.update(len(body))

    try:
        with ThreadPoolExecutor(c["data.download.workers"]) as pool:
            list(pool.map(fetch_part, [i for i in range(n_parts) if i not in done]))
    finally:
        os.close(fd)
        bar.close()
    if partial.stat().st_size != size:
        raise StageError(f"{uri}: downloaded {partial.stat().st_size} bytes, the object has {size}")
    if "-" in etag:
        first = uploaded_part_size(client, bucket, key)
        sizes = [first, part, 5 * 2**20, 8 * 2**20, 16 * 2**20, -(-size // int(etag.rsplit("-", 1)[1]))]
        verified = multipart_etag_matches(partial, etag, size, [p for p in sizes if p])
        corrupt = not verified and first is not None  # the upload's part size is known: the bytes are wrong
    else:
        verified = hashlib.md5(partial.read_bytes()).hexdigest() == etag
        corrupt = not verified
    if corrupt:  # a resumed run would take the same bad parts for done: start the object over
        partial.unlink()
        state_path.unlink()
        raise StageError(f"{uri}: a part arrived corrupted: the download does not match the object's ETag {etag}; "
                         f"it was discarded, run the stage again")
    os.replace(partial, dest)
    state_path.unlink()
    return {"key": key, "etag": etag, "size": size, "etag_verified": verified}


def fetch_s3(uri, c, workdir):
    """s3://bucket/key, or every object under s3://bucket/prefix/ (keys that would escape workdir refused)."""
    bucket, _, key = uri[len("s3://"):].partition("/")
    if not bucket:
        raise StageError(f"{uri}: expected s3://bucket/key or s3://bucket/prefix/")
    client = s3_client(c)
    if key and not key.endswith("/"):
        dest = workdir / Path(key).name
        return [(uri, dest)], [download_s3_object(client, bucket, key, dest, c)]
    keys = []
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key):
            keys += [o["Key"] for o in page.get("Contents", []) if not o["Key"].endswith("/")]
    except Exception as e:
        raise s3_failure(client, e, uri, bucket) from None
    if not keys:
        raise StageError(f"{uri}: no objects under this prefix")
    files, identity = [], []
    for k in sorted(keys):
        rel = k[len(key):]
        if rel.startswith("/") or ".." in Path(rel).parts or Path(rel).is_absolute():
            raise StageError(f"s3://{bucket}/{k}: key would escape the destination directory; refused")
        dest = workdir / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        identity.append(download_s3_object(client, bucket, k, dest, c))
        files.append((f"s3://{bucket}/{k}", dest))
    return files, identity


def fetch_http(url, dest):
    """Stream url to dest with retries; a partial file is continued with a Range request when the server
    supports it. The size is checked against Content-Length."""
    from tqdm import tqdm

    partial = dest.with_name(dest.name + ".partial")
    for attempt in range(6):
        have = partial.stat().st_size if partial.exists() else 0
        request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
        try:
            with urllib.request.urlopen(request, timeout=60) as resp:
                if have and resp.status != 206:
                    have = 0  # the server ignored the range: start over
                length = resp.headers.get("Content-Length")
                with writing(partial), open(partial, "ab" if have else "wb") as f, tqdm(
                        total=have + int(length) if length else None, initial=have, unit="B", unit_scale=True,
                        desc=Path(dest).name, leave=False, file=sys.stdout) as bar:
                    for block in iter(lambda: resp.read(1 << 20), b""):
                        f.write(block)
                        bar.update(len(block))
            break
        except urllib.error.HTTPError as e:
            if e.code >= 500 and attempt < 5:
                time.sleep(2 ** attempt)
                continue
            hint = {403: "access denied (the file needs credentials or does not exist)",
                    404: "no such file", 416: "range not satisfiable"}.get(e.code, e.reason)
            raise StageError(f"{url}: HTTP {e.code}, {hint}") from None
        except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
            if attempt < 5:
                time.sleep(2 ** attempt)
                continue
            raise StageError(f"{url}: cannot connect ({getattr(e, 'reason', e)}); check the address and the "
                             f"network") from None
    if length is not None and partial.stat().st_size != have + int(length):
        raise StageError(f"{url}: received {partial.stat().st_size} bytes, expected {have + int(length)}")
    os.replace(partial, dest)
    return [(url, dest)], [{"size": dest.stat().st_size}]


def fetch_hf(uri, workdir):
    """hf://datasets/<owner>/<name>[:split] through `datasets` (its own cache and HF token handling)."""
    import datasets

    repo, _, split = uri[len("hf://datasets/"):].partition(":")
    try:
        ds = datasets.load_dataset(repo, split=split or "train")
    except Exception as e:
        raise StageError(f"{uri}: cannot be loaded with datasets ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from None
    dest = workdir / "records.jsonl"
    with writing(dest), open(dest, "w", encoding="utf-8") as f:
        for row in ds:
            f.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
    return [(uri, dest)], [{"rows": len(ds), "fingerprint": ds._fingerprint}]


def local_path(uri):
    return Path(os.path.expanduser(uri[len("file://"):] if uri.startswith("file://") else uri))


def fetch(uri, c, workdir):
    """Bring the source into workdir: [(label for messages, local file)] and what identifies each object."""
    if not uri.startswith(("s3://", "https://", "http://", "hf://datasets/")):
        src = local_path(uri)
        if not src.is_file():
            raise StageError(f"{uri}: local file not found")
        return [(uri, src)], [{"path": str(src)}]
    workdir.mkdir(parents=True, exist_ok=True)
    if uri.startswith("s3://"):
        return fetch_s3(uri, c, workdir)
    if uri.startswith(("https://", "http://")):
        return fetch_http(uri, workdir / (Path(urllib.parse.urlparse(uri).path).name or "download"))
    return fetch_hf(uri, workdir)


def source_identity(uri, c):
    """What identifies the source's current content without downloading it, or None when that is unknown."""
    if uri.startswith("s3://"):
        bucket, _, key = uri[len("s3://"):].partition("/")
        if key and not key.endswith("/"):
            size, etag = s3_head(s3_client(c), bucket, key)
            return {"etag": etag.strip('"'), "size": size}
        return None
    if uri.startswith(("https://", "http://", "hf://")):
        return None
    src = local_path(uri)
    return {"sha256": file_sha256(src)} if src.is_file() else None


# ------------------------------------------------------------------------------------------------ validate
def to_record(line):
    """(record, None) for a valid line, (None, reason) otherwise."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        return None, f"not valid JSON ({e.msg} at column {e.colno})"
    if not isinstance(obj, dict):
        return None, f"expected a JSON object, got {type(obj).__name__}"
    if "input" not in obj and "instruction" in obj:
        fields = ("instruction", "context", "response")
        bad = [f for f in fields if not isinstance(obj.get(f, ""), str)]
        if bad or "response" not in obj:
            return None, "dolly record needs string 'instruction', 'response' and optional 'context'"
        context = obj.get("context", "").strip()
        inp = obj["instruction"] + (f"\n\n{context}" if context else "")
        rest = {k: v for k, v in obj.items() if k not in fields}
        return {"input": inp, "output": obj["response"], **rest}, None
    for field in ("input", "output"):
        if field not in obj:
            return None, f"missing field '{field}'"
        if not isinstance(obj[field], str):
            return None, f"field '{field}' must be a string, got {type(obj[field]).__name__}"
    return obj, None


def validate(raw_path, label, policy):
    """Valid records and the rejected lines; a bad line under policy 'fail' stops with file:line."""
    records, rejected = [], []
    with open(raw_path, encoding="utf-8", errors="strict") as f:
        try:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                record, reason = to_record(line)
                if record is None:
                    if policy == "fail":
                        raise StageError(f"{label}:{lineno}: {reason} (set data.download.bad_lines=skip to skip "
                                         f"bad lines)")
                    rejected.append({"line": lineno, "reason": reason})
                else:
                    records.append(record)
        except UnicodeDecodeError:
            raise StageError(f"{label}: not UTF-8 text") from None
    return records, rejected


# ------------------------------------------------------------------------------------------------ split
def manifest_of(dest):
    return dest.with_name(dest.name + ".manifest.json")


def written_here(dest):
    """True when `dest` is an earlier output of this stage: its manifest (which this stage writes beside every
    output) is there and names a checksum of the output."""
    try:
        manifest = json.loads(manifest_of(dest).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and "output_sha256" in manifest


def check_output(uri, dest, key):
    """Pre-flight for one split, before anything is downloaded: the destination is a file path that can be
    written, and what is there already is an earlier output of this stage (never the source, a directory or
    a file of the user's)."""
    if not uri.startswith(("s3://", "https://", "http://", "hf://")) and local_path(uri).resolve() == dest.resolve():
        raise StageError(f"{key}: {dest} is also the split's source ({uri}); 01 never replaces its source: point "
                         f"{key} at a new file")
    if dest.is_dir():
        raise StageError(f"{key}: {dest} is a directory; this key names the jsonl file that 01 writes (e.g. "
                         f"{dest / 'training.jsonl'}), so the directory is left as it is")
    if dest.exists() and not written_here(dest):
        refuse_foreign(dest, key, f"no {manifest_of(dest).name} beside it")
    if manifest_of(dest).exists() and not written_here(dest):
        refuse_foreign(manifest_of(dest), key, "not a manifest of this stage")
    check_writable(dest, key)


def token_lengths(records, tokenizer_dir):
    """Length statistics (tokens of input + output) when a usable tokenizer is already there, else None (they
    are informative only, so a tokenizer that cannot be loaded is reported and skipped)."""
    if not tokenizer_dir or not (Path(tokenizer_dir) / "tokenizer.json").is_file():
        return None
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    except Exception as e:
        print(f"note: token length statistics skipped: {tokenizer_dir} cannot be loaded ({type(e).__name__})")
        return None
    lengths = sorted(len(tok.encode(r["input"] + r["output"], add_special_tokens=False)) for r in records)
    pick = lambda q: lengths[min(len(lengths) - 1, int(q * len(lengths)))]  # noqa: E731
    return {"min": lengths[0], "mean": sum(lengths) / len(lengths), "p50": pick(0.5), "p95": pick(0.95),
            "max": lengths[-1], "tokenizer": str(tokenizer_dir)}


def up_to_date(uri, dest, identity, c):
    """True when dest is exactly what an earlier run wrote from this very source content and policy."""
    if identity is None or not dest.exists() or not manifest_of(dest).exists():
        return False
    old = json.loads(manifest_of(dest).read_text())
    return (old.get("source") == uri and old.get("source_identity") == identity
            and old.get("bad_lines") == c["data.download.bad_lines"] and old.get("output_sha256") == file_sha256(dest))


def download_split(uri, dest, c):
    """Fetch, validate and write one split plus its manifest; outputs appear only when complete (the manifest
    first, so that the output beside it is always recognised as this stage's). Partial downloads stay in
    .<name>.download/ beside the output so that a re-run resumes them."""
    identity = source_identity(uri, c)
    if up_to_date(uri, dest, identity, c):
        print(f"{dest}: up to date with {uri} (verified by checksum); nothing to do")
        return
    files, objects = fetch(uri, c, dest.parent / f".{dest.name}.download")
    records, rejected = [], []
    for (label, path), obj in zip(files, objects):
        obj["sha256"] = file_sha256(path)
        ok, bad = validate(path, label, c["data.download.bad_lines"])
        records += ok
        rejected += [dict(r, source=label) for r in bad]
    if not records:
        raise StageError(f"{uri}: no valid records")
    seen, duplicates = set(), 0
    for r in records:
        key = (r["input"], r["output"])
        duplicates += key in seen
        seen.add(key)
    tmp = staging(dest)
    try:
        with writing(dest):
            (tmp / dest.name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records),
                                         encoding="utf-8")
            manifest = {
                "written_by": STAGE, "source": uri, "source_identity": identity, "source_objects": objects,
                "source_sha256": objects[0]["sha256"] if len(objects) == 1 else None,
                "output": str(dest), "output_sha256": file_sha256(tmp / dest.name), "records": len(records),
                "bad_lines": c["data.download.bad_lines"], "rejected": len(rejected), "rejected_lines": rejected,
                "duplicates": duplicates, "token_lengths": token_lengths(records, c["data.tokenizer.type"]),
                "config": redacted(c),
            }
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
            publish(tmp / "manifest.json", manifest_of(dest))
            publish(tmp / dest.name, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(dest.parent / f".{dest.name}.download", ignore_errors=True)
    unverified = [o["key"] for o in objects if o.get("etag_verified") is False]
    print(f"{dest}: {len(records)} records ({len(rejected)} rejected, {duplicates} duplicates) from {uri}")
    if unverified:
        print(f"  size verified, ETag not checkable (multipart upload of unknown part size): {unverified}")
    for r in rejected[:10]:
        print(f"  skipped {r['source']}:{r['line']}: {r['reason']}")


# ------------------------------------------------------------------------------------------------ main
def main(argv=None):
    args = config_arg_parser(__doc__).parse_intermixed_args(argv)
    paths = args.config or ["config.yaml"]
    c = resolve(load_config(paths, args.overrides), SCHEMA)
    show_settings(c, paths, args.overrides, SCHEMA)
    splits = [(c["data.download.train_uri"], c["data.train_dir"], "data.train_dir")]
    if c["data.download.val_uri"]:
        if not c["data.val_dir"]:
            raise StageError("data.download.val_uri is set but data.val_dir is null")
        splits.append((c["data.download.val_uri"], c["data.val_dir"], "data.val_dir"))
    if len(splits) == 2 and Path(splits[0][1]).absolute() == Path(splits[1][1]).absolute():
        raise StageError(f"data.train_dir and data.val_dir are the same file {splits[0][1]}; give each split its own")
    for uri, dest, key in splits:  # every output checked before anything is downloaded
        check_output(uri, Path(dest), key)
    for uri, dest, _ in splits:
        download_split(uri, Path(dest), c)


if __name__ == "__main__":
    try:
        main()
    except StageError as e:
        sys.exit(f"error: {e}")
