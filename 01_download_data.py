#!/usr/bin/env python3
"""Stage 01: fetch the SFT data, validate every record and write the jsonl files that 05 reads.

Sources (data.download.train_uri / val_uri)
  a local path (or file://...)          copied
  https://... or http://...             streamed to a temporary file, renamed when complete and size-checked
  s3://bucket/key                       anonymous (unsigned) HTTPS GET of the object, like
                                        `aws s3 cp --no-sign-request`; AWS_ENDPOINT_URL selects another endpoint

Records
  Each line must be a JSON object with string "input" and "output" (other fields are kept). Raw
  databricks-dolly records (instruction, context, response) are converted the NeMo way: input = instruction,
  followed by a blank line and the context when there is one; output = response. A bad line is reported as
  file:line with the reason; data.download.bad_lines decides whether the stage stops (fail) or skips and counts
  it (skip). Blank lines are ignored.

Outputs
  data.train_dir, data.val_dir   validated jsonl, written under a temporary name and renamed
  <file>.manifest.json            source, sha256 of the source and of the output, record counts, rejected lines
                                  with reasons, duplicate records, resolved config

Commands (the same on CPU, CUDA and Trainium hosts)
  python 01_download_data.py --config config.yaml
  python 01_download_data.py --config config.yaml --config demo.yaml
"""

import argparse
import hashlib
import json
import os
import shutil
import sys
import urllib.error
import urllib.request
from pathlib import Path

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
    "data.download.train_uri": "str",
    "data.download.val_uri": "str?",
    "data.download.anonymous": "bool",
    "data.download.bad_lines": "fail|skip",
    "data.train_dir": "path",
    "data.val_dir": "path?",
}


# ------------------------------------------------------------------------------------------------ fetch
def s3_https_url(uri):
    """The HTTPS address of an S3 object, for an unsigned GET (AWS_ENDPOINT_URL: path-style on that host)."""
    bucket, _, key = uri[len("s3://"):].partition("/")
    if not bucket or not key:
        raise StageError(f"{uri}: expected s3://bucket/key")
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        return f"{endpoint.rstrip('/')}/{bucket}/{urllib.request.quote(key)}"
    return f"https://{bucket}.s3.amazonaws.com/{urllib.request.quote(key)}"


def http_download(url, uri, dest):
    """Stream url to dest (a temporary name), checking the size against Content-Length."""
    try:
        with urllib.request.urlopen(url, timeout=60) as resp, open(dest, "wb") as f:
            expected = resp.headers.get("Content-Length")
            shutil.copyfileobj(resp, f, 1 << 20)
    except urllib.error.HTTPError as e:
        hint = {403: "access denied: the object needs credentials or does not exist (S3 answers 403 for both)",
                404: "no such object or bucket"}.get(e.code, e.reason)
        raise StageError(f"{uri}: HTTP {e.code}, {hint}") from None
    except urllib.error.URLError as e:
        raise StageError(f"{uri}: cannot connect ({e.reason}); check the address and the network") from None
    except OSError as e:
        raise StageError(f"{uri}: writing {dest} failed ({e.strerror})") from None
    if expected is not None and dest.stat().st_size != int(expected):
        raise StageError(f"{uri}: received {dest.stat().st_size} bytes, the server announced {expected}")


def fetch(uri, anonymous, dest):
    """Bring the source to the local file `dest`."""
    if uri.startswith("s3://"):
        if not anonymous:
            raise StageError(f"{uri}: signed S3 requests are not supported by this version; the object must "
                             f"be public (data.download.anonymous: true) or copied locally first")
        http_download(s3_https_url(uri), uri, dest)
    elif uri.startswith(("https://", "http://")):
        http_download(uri, uri, dest)
    else:
        src = Path(os.path.expanduser(uri[len("file://"):] if uri.startswith("file://") else uri))
        if not src.is_file():
            raise StageError(f"{uri}: local file not found")
        shutil.copyfile(src, dest)


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


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------ split
def prepare_split(uri, dest, c):
    """Fetch, validate and write one split plus its manifest; outputs appear only when complete."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    raw = dest.with_name(dest.name + ".download")
    try:
        fetch(uri, c["data.download.anonymous"], raw)
        records, rejected = validate(raw, uri, c["data.download.bad_lines"])
        if not records:
            raise StageError(f"{uri}: no valid records")
        source_sha = sha256(raw)
    finally:
        raw.unlink(missing_ok=True)
    seen, duplicates = set(), 0
    for r in records:
        key = (r["input"], r["output"])
        duplicates += key in seen
        seen.add(key)
    tmp = dest.with_name(dest.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    manifest = {
        "source": uri, "source_sha256": source_sha, "output": str(dest), "output_sha256": sha256(tmp),
        "records": len(records), "rejected": len(rejected), "rejected_lines": rejected,
        "duplicates": duplicates, "config": redacted(c),
    }
    manifest_tmp = dest.with_name(dest.name + ".manifest.json.tmp")
    manifest_tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, dest)
    os.replace(manifest_tmp, dest.with_name(dest.name + ".manifest.json"))
    print(f"{dest}: {len(records)} records ({len(rejected)} rejected, {duplicates} duplicates) from {uri}")
    for r in rejected[:10]:
        print(f"  skipped {uri}:{r['line']}: {r['reason']}")


# ------------------------------------------------------------------------------------------------ main
def main(argv=None):
    args = config_arg_parser(__doc__.split("\n\n")[0]).parse_args(argv)
    c = resolve(load_config(args.config or ["config.yaml"], args.overrides), SCHEMA)
    for k, v in redacted(c).items():
        print(f"  {k}: {v}")
    splits = [(c["data.download.train_uri"], c["data.train_dir"])]
    if c["data.download.val_uri"]:
        if not c["data.val_dir"]:
            raise StageError("data.download.val_uri is set but data.val_dir is null")
        splits.append((c["data.download.val_uri"], c["data.val_dir"]))
    for uri, dest in splits:
        prepare_split(uri, dest, c)


if __name__ == "__main__":
    try:
        main()
    except StageError as e:
        sys.exit(f"error: {e}")
