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
  hf://datasets/owner/name[:split]   through `datasets` (default split: train; its cache and HF token)
  a local path (or file://...): a file of one of the kinds below, or a `datasets` save_to_disk directory

File kinds (the same reader as stage 05's)
  JSON lines (UTF-8; a BOM and CRLF line ends tolerated), the same gzip-compressed (.jsonl.gz), a file holding
  one JSON array, parquet, arrow, a `datasets` directory. A line that is not UTF-8 or not JSON is a bad line.

Records: formats recognised by their fields (data.format: auto), each converted to a normalized form
  {input, output}                      the tutorial's, kept as it is
  {instruction, context?, response}    databricks-dolly, the NeMo way: input = instruction, then a blank line
                                       and the context when there is one; output = response
  {instruction, input?, output}        Alpaca: input = instruction, then a blank line and the input when there
                                       is one (the dolly layout, so both instruction formats read alike)
  {prompt, completion}                 TRL prompt-completion: strings -> {input, output}; lists of messages
                                       (conversational) -> one conversation in which only the completion trains
  {messages: [{role, content}]}        OpenAI / HF chat, any number of turns -> kept as a conversation; with tool
                                       calls (tool_calls, the older function_call), tool results (role tool or
                                       function), a record-level tools list (or JSON string), reasoning
                                       (reasoning_content or thinking) and content as a list of text parts, all
                                       written in one shape: {messages, tools} with JSON arguments as objects
  {conversations: [{from, value}]}     ShareGPT (system / human / gpt) -> a conversation with OpenAI roles; also
                                       LLaMA-Factory's function_call / observation turns, tools and system fields
  Fields no format uses (ids, categories, ...) are kept; a field of another format (instruction beside
  input/output) is an error, never dropped; data.rename_fields renames fields first ("question=input").
  A record that fits no format, has an empty prompt or output, or a conversation without an assistant turn or
  ending on a user turn, is a bad line: reported as file:line with the reason; data.download.bad_lines decides
  whether the stage stops (fail) or skips and counts it (skip). Blank lines are ignored.

Outputs
  data.train_dir, data.val_dir   validated jsonl (each key names a file, despite "dir"), written under a
                                  temporary name and renamed
  <file>.manifest.json            source and its identity (ETag/size or sha256), sha256 of every object and of
                                  the output, records per format, rejections per reason and each rejected line
                                  with its reason, duplicates, token length statistics (when
                                  data.tokenizer.type exists already), resolved config
  A re-run whose source and output are unchanged (checked by ETag or checksum) does nothing and says so; a
  changed source replaces the earlier output, unless that output was edited since 01 wrote it (its sha256 is not
  the manifest's): then only --overwrite replaces it. An existing path that 01 did not write (no manifest beside
  it: a directory, the source itself, a file of yours) is refused before anything is downloaded, and left as it is.

Main keys
  data.download.train_uri, data.download.val_uri   sources (train_uri may list several, one per data.train_dir)
  data.download.anonymous, .endpoint_url, .region, .profile   S3 access
  data.download.bad_lines                         fail | skip
  data.format, data.rename_fields                 record format (auto) and field renames
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

# ------------------------------------------------------------------------------------------------ settings
STAGE = "01_download_data.py"


# The config keys this stage reads, their types and ranges (validated before any work starts).
SCHEMA = {
    "data.download.train_uri": "str+",
    "data.download.val_uri": "str?",
    "data.download.anonymous": "bool",
    "data.download.bad_lines": "fail|skip",
    "data.download.endpoint_url": "str?",
    "data.download.region": "str?",
    "data.download.profile": "str?",
    "data.download.part_size_mb": "int >= 1",
    "data.download.workers": "int >= 1",
    "data.train_dir": "path+",
    "data.val_dir": "path?",
    "data.format": "auto|input_output|dolly|alpaca|prompt_completion|messages|sharegpt",
    "data.rename_fields": "list[str]",
    "data.tokenizer.type": "path",
}


# ------------------------------------------------------------------------------------------------ fetch
def s3_client(c):
    """boto3 S3 client: unsigned requests when anonymous, else the standard credential chain (or a profile).
    AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3 are honoured by botocore itself; endpoint_url overrides them."""
    import boto3
    from botocore import UNSIGNED
    from botocore.config import Config

    config = Config(
        signature_version=UNSIGNED if c["data.download.anonymous"] else None,
        retries={"mode": "standard", "max_attempts": 8},
        region_name=c["data.download.region"],
        max_pool_connections=max(10, c["data.download.workers"]),
    )
    session = boto3.Session(profile_name=c["data.download.profile"])
    return session.client("s3", endpoint_url=c["data.download.endpoint_url"], config=config)


def s3_failure(client, error, uri, bucket):
    """A one-line StageError saying what went wrong with an S3 request and how to fix it."""
    from botocore.exceptions import ClientError, EndpointConnectionError, FlexibleChecksumError, NoCredentialsError

    if isinstance(error, FlexibleChecksumError):  # the object's stored checksum, checked by botocore per response
        return StageError(
            f"{uri}: a part arrived corrupted (its checksum does not match the object's: {error}); "
            f"it was not kept, run the stage again"
        )
    if isinstance(error, NoCredentialsError):
        return StageError(
            f"{uri}: no AWS credentials found (data.download.anonymous is false); configure a "
            f"profile (data.download.profile) or AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY"
        )
    if isinstance(error, EndpointConnectionError):
        return StageError(
            f"{uri}: cannot reach the S3 endpoint ({error.kwargs.get('endpoint_url')}); check the "
            f"network, data.download.endpoint_url and AWS_ENDPOINT_URL"
        )
    if not isinstance(error, ClientError):
        return StageError(f"{uri}: {type(error).__name__}: {error}")
    code = error.response.get("Error", {}).get("Code", "")
    if code in ("403", "AccessDenied", "Forbidden"):
        return StageError(
            f"{uri}: access denied; this object needs credentials: set data.download.anonymous: "
            f"false and provide AWS credentials"
        )
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
            for block in iter(lambda n=part: f.read(n), b""):
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
    bar = tqdm(
        total=size,
        initial=min(size, len(done) * part),
        unit="B",
        unit_scale=True,
        desc=key,
        leave=False,
        file=sys.stdout,
    )
    fd = os.open(partial, os.O_RDWR)

    def fetch_part(i):
        first, last = i * part, min(size, (i + 1) * part) - 1
        try:
            body = client.get_object(Bucket=bucket, Key=key, Range=f"bytes={first}-{last}", IfMatch=quoted_etag)[
                "Body"
            ].read()
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
        raise StageError(
            f"{uri}: a part arrived corrupted: the download does not match the object's ETag {etag}; "
            f"it was discarded, run the stage again"
        )
    os.replace(partial, dest)
    state_path.unlink()
    return {"key": key, "etag": etag, "size": size, "etag_verified": verified}


def fetch_s3(uri, c, workdir):
    """s3://bucket/key, or every object under s3://bucket/prefix/ (keys that would escape workdir refused)."""
    bucket, _, key = uri[len("s3://") :].partition("/")
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
        rel = k[len(key) :]
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
                with (
                    writing(partial),
                    open(partial, "ab" if have else "wb") as f,
                    tqdm(
                        total=have + int(length) if length else None,
                        initial=have,
                        unit="B",
                        unit_scale=True,
                        desc=Path(dest).name,
                        leave=False,
                        file=sys.stdout,
                    ) as bar,
                ):
                    for block in iter(lambda: resp.read(1 << 20), b""):
                        f.write(block)
                        bar.update(len(block))
            break
        except urllib.error.HTTPError as e:
            if e.code >= 500 and attempt < 5:
                time.sleep(2**attempt)
                continue
            hint = {
                403: "access denied (the file needs credentials or does not exist)",
                404: "no such file",
                416: "range not satisfiable",
            }.get(e.code, e.reason)
            raise StageError(f"{url}: HTTP {e.code}, {hint}") from None
        except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
            if attempt < 5:
                time.sleep(2**attempt)
                continue
            raise StageError(
                f"{url}: cannot connect ({getattr(e, 'reason', e)}); check the address and the network"
            ) from None
    if length is not None and partial.stat().st_size != have + int(length):
        raise StageError(f"{url}: received {partial.stat().st_size} bytes, expected {have + int(length)}")
    os.replace(partial, dest)
    return [(url, dest)], [{"size": dest.stat().st_size}]


def local_path(uri):
    return Path(os.path.expanduser(uri[len("file://") :] if uri.startswith("file://") else uri))


# Names the download directory as this stage's: only a directory holding it is written into (check_output).
DOWNLOAD_MARKER = f".downloads-of-{STAGE}"


def download_dir(dest):
    """Where a split's remote objects are downloaded (and resumed) before its output is written."""
    return dest.parent / f".{dest.name}.download"


def fetch(uri, c, workdir):
    """Bring the source into workdir: [(label for messages, local file or dataset)] and what identifies each
    object. Local files and directories, and hf://datasets/... (through `datasets` and its cache), are read where
    they are."""
    if uri.startswith("hf://"):
        if not uri.startswith("hf://datasets/"):
            raise StageError(f"{uri}: expected hf://datasets/<owner>/<name>[:split]")
        return [(uri, uri)], [{"dataset": uri}]
    if not uri.startswith(("s3://", "https://", "http://")):
        src = local_path(uri)
        if not split_of(src)[0].exists():
            raise StageError(f"{uri}: local file not found")
        return [(uri, src)], [{"path": str(src)}]
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / DOWNLOAD_MARKER).touch()  # before any download: the directory is recognisably this stage's
    if uri.startswith("s3://"):
        return fetch_s3(uri, c, workdir)
    return fetch_http(uri, workdir / (Path(urllib.parse.urlparse(uri).path).name or "download"))


def source_identity(uri, c):
    """What identifies the source's current content without downloading it, or None when that is unknown."""
    if uri.startswith("s3://"):
        bucket, _, key = uri[len("s3://") :].partition("/")
        if key and not key.endswith("/"):
            size, etag = s3_head(s3_client(c), bucket, key)
            return {"etag": etag.strip('"'), "size": size}
        return None
    if uri.startswith(("https://", "http://", "hf://")):
        return None
    src = local_path(uri)
    return {"sha256": data_sha256(src)} if split_of(src)[0].exists() else None


# ------------------------------------------------------------------------------------------------ validate
def validate(source, label, c, counts):
    """Valid normalized records and the rejected lines of one file or dataset; a bad line under policy 'fail'
    stops with file:line. `counts` gathers records per format and rejections per reason."""
    records, rejected = [], []
    renames = rename_pairs(c["data.rename_fields"])
    for where, item in data_rows(source):
        try:
            record, fmt = normalize(parse_row(item), c["data.format"], renames)
        except BadRecord as bad:
            if c["data.download.bad_lines"] == "fail":
                raise StageError(
                    f"{label}:{where}: {bad.reason} (set data.download.bad_lines=skip to skip bad lines)"
                ) from None
            rejected.append({"line": where, "reason": bad.reason})
            counts["rejected"][bad.kind] = counts["rejected"].get(bad.kind, 0) + 1
            continue
        records.append(record)
        counts["formats"][fmt] = counts["formats"].get(fmt, 0) + 1
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


def check_output(uri, dest, key, overwrite=False):
    """Pre-flight for one split, before anything is downloaded: the destination is a file path that can be
    written, and what is there already is an earlier output of this stage (never the source, a directory or
    a file of the user's) as 01 wrote it: one edited since is replaced with `overwrite` only."""
    if not uri.startswith(("s3://", "https://", "http://", "hf://")) and local_path(uri).resolve() == dest.resolve():
        raise StageError(
            f"{key}: {dest} is also the split's source ({uri}); 01 never replaces its source: point {key} at a new file"
        )
    if dest.is_dir():
        raise StageError(
            f"{key}: {dest} is a directory; this key names the jsonl file that 01 writes (e.g. "
            f"{dest / 'training.jsonl'}), so the directory is left as it is"
        )
    if dest.exists() and not written_here(dest):
        refuse_foreign(dest, key, f"no {manifest_of(dest).name} beside it")
    if manifest_of(dest).exists() and not written_here(dest):
        refuse_foreign(manifest_of(dest), key, "not a manifest of this stage")
    if dest.exists() and not overwrite:
        if json.loads(manifest_of(dest).read_text())["output_sha256"] != file_sha256(dest):
            raise StageError(
                f"{key}: {dest} was changed since 01 wrote it (its sha256 is not the one in "
                f"{manifest_of(dest).name}), so it is left as it is: move it away, choose another path, or add "
                f"--overwrite to replace it"
            )
    work = download_dir(dest)
    remote = uri.startswith(("s3://", "https://", "http://"))
    if remote and work.exists() and any(work.iterdir()) and not (work / DOWNLOAD_MARKER).is_file():
        refuse_foreign(work, key, "its download directory is named so, but holds no download of this stage")
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
    texts = [r["input"] + r["output"] if "input" in r else conversation_text(r) for r in records]
    lengths = sorted(len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"])
    pick = lambda q: lengths[min(len(lengths) - 1, int(q * len(lengths)))]  # noqa: E731
    return {
        "min": lengths[0],
        "mean": sum(lengths) / len(lengths),
        "p50": pick(0.5),
        "p95": pick(0.95),
        "max": lengths[-1],
        "tokenizer": str(tokenizer_dir),
    }


def conversation_text(record):
    """A conversation's text without a chat template: contents, reasoning, tool calls and tools (as JSON)."""
    parts = [m.get("reasoning_content", "") + m.get("content", "") for m in record["messages"]]
    parts += [json.dumps(x) for x in [*(m.get("tool_calls") for m in record["messages"]), record.get("tools")] if x]
    return "".join(parts)


def up_to_date(uri, dest, identity, c):
    """True when dest is exactly what an earlier run wrote from this very source content and policy."""
    if identity is None or not dest.exists() or not manifest_of(dest).exists():
        return False
    old = json.loads(manifest_of(dest).read_text())
    return (
        old.get("source") == uri
        and old.get("source_identity") == identity
        and old.get("reading") == reading(c)
        and old.get("output_sha256") == file_sha256(dest)
    )


def reading(c):
    """The settings that decide what is written from a source."""
    return {k: c[f"data.{k}"] for k in ("download.bad_lines", "format", "rename_fields")}


def download_split(uri, dest, c):
    """Fetch, validate and write one split plus its manifest; outputs appear only when complete (the manifest
    first, so that the output beside it is always recognised as this stage's). Partial downloads stay in
    .<name>.download/ beside the output so that a re-run resumes them."""
    identity = source_identity(uri, c)
    if up_to_date(uri, dest, identity, c):
        print(f"{dest}: up to date with {uri} (verified by checksum); nothing to do")
        return
    files, objects = fetch(uri, c, download_dir(dest))
    records, rejected, counts = [], [], {"formats": {}, "rejected": {}}
    for (label, path), obj in zip(files, objects):
        obj["sha256"] = data_sha256(path) if Path(path).exists() else None
        ok, bad = validate(path, label, c, counts)
        records += ok
        rejected += [dict(r, source=label) for r in bad]
    if not records:
        raise StageError(f"{uri}: no valid records")
    seen, duplicates = set(), 0
    for r in records:
        key = json.dumps([r.get("input"), r.get("output"), r.get("messages")])
        duplicates += key in seen
        seen.add(key)
    tmp = staging(dest)
    try:
        with writing(dest):
            (tmp / dest.name).write_text(
                "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8"
            )
            manifest = {
                "written_by": STAGE,
                "source": uri,
                "source_identity": identity,
                "source_objects": objects,
                "source_sha256": objects[0]["sha256"] if len(objects) == 1 else None,
                "output": str(dest),
                "output_sha256": file_sha256(tmp / dest.name),
                "records": len(records),
                "formats": counts["formats"],
                "reading": reading(c),
                "bad_lines": c["data.download.bad_lines"],
                "rejected": len(rejected),
                "rejected_by_reason": counts["rejected"],
                "rejected_lines": rejected,
                "duplicates": duplicates,
                "token_lengths": token_lengths(records, c["data.tokenizer.type"]),
                "config": redacted(c),
            }
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
            publish(tmp / "manifest.json", manifest_of(dest))
            publish(tmp / dest.name, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(dest.parent / f".{dest.name}.download", ignore_errors=True)
    unverified = [o["key"] for o in objects if o.get("etag_verified") is False]
    formats = ", ".join(f"{n} {name}" for name, n in counts["formats"].items())
    print(f"{dest}: {len(records)} records ({formats}; {len(rejected)} rejected, {duplicates} duplicates) from {uri}")
    if unverified:
        print(f"  size verified, ETag not checkable (multipart upload of unknown part size): {unverified}")
    for r in rejected[:10]:
        print(f"  skipped {r['source']}:{r['line']}: {r['reason']}")


# ------------------------------------------------------------------------------------------------ main
def main(argv=None):
    ap = config_arg_parser(__doc__)
    ap.add_argument("--overwrite", action="store_true", help="replace an earlier output of 01 that was edited since")
    args = ap.parse_intermixed_args(argv)
    paths = args.config or ["config.yaml"]
    c = resolve(load_config(paths, args.overrides), SCHEMA)
    show_settings(c, paths, args.overrides, SCHEMA)
    uris, dests = ([x] if isinstance(x, str) else x for x in (c["data.download.train_uri"], c["data.train_dir"]))
    if len(uris) != len(dests):
        raise StageError(
            f"data.download.train_uri names {len(uris)} source(s) and data.train_dir {len(dests)} file(s): "
            f"give one file per source (a list for several training sources, mixed by data.mix in 05)"
        )
    splits = [(uri, dest, "data.train_dir") for uri, dest in zip(uris, dests)]
    if c["data.download.val_uri"]:
        if not c["data.val_dir"]:
            raise StageError("data.download.val_uri is set but data.val_dir is null")
        splits.append((c["data.download.val_uri"], c["data.val_dir"], "data.val_dir"))
    outs = [Path(dest).absolute() for _, dest, _ in splits]
    if len(set(outs)) < len(outs):
        raise StageError(
            f"data.train_dir and data.val_dir are the same file {next(o for o in outs if outs.count(o) > 1)}; "
            f"give each split (and each training source) its own"
        )
    for uri, dest, key in splits:  # every output checked before anything is downloaded
        check_output(uri, Path(dest), key, args.overwrite)
    for uri, dest, _ in splits:
        download_split(uri, Path(dest), c)


# ------------------------------------------------------------------------------------------------ records
# The record reader: it reads the file kinds below and recognises each record's format by its fields, converting
# it to one of two normalized forms, the only ones stage 05 reads (05 carries parse_row and check_conversation,
# the same text, tests/test_config.py):
#   single-turn   {"input": prompt, "output": response, ...}
#   conversation  {"messages": [{"role": ..., "content": str, ...}, ...], "tools": [...] (when given), ...}
#                 in the OpenAI / transformers shape that chat templates render (check_conversation)
# Fields that no format uses (ids, categories, ...) are kept as they are; a field that some other format uses is
# an error, never dropped.
RECORD_FORMATS = {  # name: (required fields, optional fields)
    "input_output": ({"input", "output"}, set()),  # the tutorial's
    "dolly": ({"instruction", "response"}, {"context"}),  # databricks-dolly: input = instruction + blank line + context
    "alpaca": ({"instruction", "output"}, {"input"}),  # input = instruction + blank line + input (as dolly's context)
    "prompt_completion": ({"prompt", "completion"}, set()),  # TRL: strings, or lists of messages (conversational)
    "messages": ({"messages"}, {"tools"}),  # OpenAI / HF chat: [{role, content, ...}], tool schemas
    "sharegpt": ({"conversations"}, {"tools", "system"}),  # [{from, value}]; LLaMA-Factory adds tools and system
}
CONTENT_FIELDS = set().union(*(required | optional for required, optional in RECORD_FORMATS.values()))
# MESSAGE_KEYS: beside role and content, the keys a message of each role may hold. SHAREGPT_ROLES: LLaMA-Factory's
# function_call and observation turns are a tool call and its result.
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "function_call": "assistant",
    "observation": "tool",
    "tool": "tool",
}
MESSAGE_KEYS = dict(system="", user="", assistant="tool_calls reasoning_content train", tool="tool_call_id name")


class BadRecord(Exception):
    """A record that cannot be trained on: `kind` is a short category (counted in 01's manifest), `reason` the
    whole explanation."""

    def __init__(self, kind, reason):
        super().__init__(reason)
        self.kind, self.reason = kind, reason


def data_rows(path):
    """(where, item) for every record of a data file or dataset, in order: `where` is a line number (JSON lines) or
    'record N' / 'row N'; `item` is the raw line (bytes, parsed by parse_row) or the record itself. Reads JSON lines
    (UTF-8, a BOM and CRLF tolerated, gzip-compressed when the file is), a file holding one JSON array, parquet,
    arrow, a `datasets` save_to_disk directory (<dir>:<split> for one split of a DatasetDict), and
    hf://datasets/<owner>/<name>[:split] (default split: train)."""
    text = str(path)
    if text.startswith("hf://datasets/"):
        yield from table_rows(hf_dataset(text))
        return
    path, split = split_of(path)
    if path.is_dir():
        yield from table_rows(saved_dataset(path, split))
    elif not path.is_file():
        raise StageError(f"data file {path} not found")
    elif path.suffix == ".parquet":
        yield from parquet_rows(path)
    elif path.suffix == ".arrow":
        yield from table_rows(arrow_dataset(path))
    else:
        yield from json_rows(path)


def json_rows(path):
    """JSON lines, or one JSON array (read whole: use JSON lines for big sets); gzip when the file starts so. A
    .jsonl (.ndjson) file is always lines; another holding an array from its first character is an array."""
    import gzip

    with open(path, "rb") as probe:
        zipped = probe.read(2) == b"\x1f\x8b"
    opener = gzip.open if zipped else open
    lines_only = path.name.removesuffix(".gz").endswith((".jsonl", ".ndjson"))
    try:
        with opener(path, "rb") as f:
            head = f.read(4096).removeprefix(b"\xef\xbb\xbf").lstrip()
        if head.startswith(b"[") and not lines_only:
            with opener(path, "rb") as f:
                try:
                    rows = json.loads(f.read().decode("utf-8-sig"))
                except (UnicodeDecodeError, json.JSONDecodeError) as e:
                    where = f":{e.lineno}" if isinstance(e, json.JSONDecodeError) else ""
                    raise StageError(f"{path}{where}: not a valid JSON array file ({e})") from None
            yield from ((f"record {i}", row) for i, row in enumerate(rows, start=1))
            return
        with opener(path, "rb") as f:
            for lineno, line in enumerate(f, start=1):
                if lineno == 1:
                    line = line.removeprefix(b"\xef\xbb\xbf")
                if line.strip():
                    yield lineno, line
    except (OSError, EOFError) as e:
        raise StageError(f"{path}: cannot be read ({e})") from None


def parquet_rows(path):
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=2048)
    except Exception as e:
        raise StageError(f"{path}: cannot be read as parquet ({type(e).__name__}: {first_line(e)})") from None
    row = 0
    for batch in batches:
        for record in batch.to_pylist():
            row += 1
            yield f"row {row}", record


def arrow_dataset(path):
    import datasets

    try:
        return datasets.Dataset.from_file(str(path))
    except Exception as e:
        raise StageError(f"{path}: cannot be read as arrow ({type(e).__name__}: {first_line(e)})") from None


def split_of(path):
    """(directory, split name or None) of a `datasets` save_to_disk directory given as <dir> or <dir>:<split>."""
    head, colon, split = str(path).rpartition(":")
    if colon and not Path(path).exists() and Path(head).is_dir():
        return Path(head), split
    return Path(path), None


def saved_dataset(path, split=None):
    """A `datasets` save_to_disk directory; of a DatasetDict, the named split, or its only one."""
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:
        raise StageError(
            f"{path}: a directory, but not one that datasets' save_to_disk wrote ({type(e).__name__}: {first_line(e)})"
        ) from None
    if not isinstance(ds, datasets.DatasetDict):
        if split is not None:
            raise StageError(f"{path}: one dataset, not a DatasetDict of splits; name the directory without ':{split}'")
        return ds
    if split is None and len(ds) > 1:
        raise StageError(f"{path}: a DatasetDict of splits {sorted(ds)}; name the one to read: {path}:<split>")
    if split is not None and split not in ds:
        raise StageError(f"{path}: no split '{split}' in this DatasetDict (splits: {sorted(ds)})")
    return ds[split or next(iter(ds))]


def hf_dataset(uri):
    """hf://datasets/<owner>/<name>[:split] through `datasets` (its own cache and HF token handling)."""
    import datasets

    repo, _, split = uri[len("hf://datasets/") :].partition(":")
    try:
        return datasets.load_dataset(repo, split=split or "train")
    except Exception as e:
        raise StageError(f"{uri}: cannot be loaded with datasets ({type(e).__name__}: {first_line(e)})") from None


def table_rows(ds):
    row = 0
    for batch in ds.iter(batch_size=2048):
        for values in zip(*batch.values()):
            row += 1
            yield f"row {row}", dict(zip(batch, values))


def data_sha256(path):
    """What identifies a data source's content: the sha256 of a file, or of a directory's files (names and
    contents, in order), or for hf://datasets/... the fingerprint `datasets` gives the cached dataset."""
    if str(path).startswith("hf://datasets/"):
        return hf_dataset(str(path))._fingerprint
    path, split = split_of(path)
    if path.is_file():
        return file_sha256(path)
    import hashlib

    h = hashlib.sha256(f"{split}\0".encode() if split else b"")
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(path)}\0{file_sha256(f)}\0".encode())
    return h.hexdigest()


def first_line(e):
    return str(e).splitlines()[0] if str(e) else ""


def parse_row(item):
    """The record of one item of a data file: a JSON line (bytes) decoded and parsed, or a table's record itself."""
    if isinstance(item, bytes):
        try:
            text = item.decode("utf-8")
        except UnicodeDecodeError as e:
            raise BadRecord(
                "not UTF-8", f"not UTF-8 text (byte 0x{item[e.start]:02x} at byte {e.start + 1} of the line)"
            ) from None
        try:
            item = json.loads(text)
        except json.JSONDecodeError as e:
            raise BadRecord("not valid JSON", f"not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(item, dict):
        raise BadRecord("not an object", f"expected a JSON object, got {type(item).__name__}")
    return item


def rename_pairs(entries):
    """data.rename_fields ["from=to", ...] as (from, to) pairs."""
    pairs = [tuple(e.split("=")) for e in entries]
    bad = [e for e, p in zip(entries, pairs) if len(p) != 2 or not all(p)]
    if bad:
        raise StageError(f"config: 'data.rename_fields' entries must be 'from=to', got {bad[0]!r}")
    return pairs


def normalize(row, fmt="auto", renames=()):
    """(normalized record, format name) of one record: its format recognised by its content fields (or `fmt`),
    converted as the comments of RECORD_FORMATS say; BadRecord when it fits no format or would train nothing.
    `renames` are (from, to) field names applied first (data.rename_fields)."""
    row = {k: v for k, v in row.items() if v is not None}  # columnar files hold null for a field a record lacks
    for old, new in renames:
        if old in row:
            if new in row:
                raise BadRecord("field clash", f"field '{old}' would be renamed to '{new}', which is there too")
            row[new] = row.pop(old)
    present = CONTENT_FIELDS & set(row)
    matches = [
        name for name, (req, opt) in RECORD_FORMATS.items() if fmt in ("auto", name) and req <= present <= req | opt
    ]
    if not matches:  # the field sets are disjoint, so at most one format matches
        raise BadRecord("no format", format_mismatch(row, present, fmt))
    name, rest = matches[0], {k: v for k, v in row.items() if k not in CONTENT_FIELDS}
    if name == "prompt_completion" and isinstance(row["prompt"], list):
        return {**conversational_prompt_completion(row["prompt"], row["completion"]), **rest}, name
    if name in ("messages", "sharegpt"):
        turns = row["messages"] if name == "messages" else from_sharegpt(row["conversations"], row.get("system"))
        return {**standard_conversation(turns, row.get("tools")), **rest}, name
    fields = {k: row[k] for k in present}
    for key, value in fields.items():
        if not isinstance(value, str):
            raise BadRecord("not a string", f"field '{key}' must be a string, got {type(value).__name__}")
    if name == "input_output":
        prompt, output = fields["input"], fields["output"]
    elif name == "prompt_completion":
        prompt, output = fields["prompt"], fields["completion"]
    else:  # dolly and alpaca: the instruction, then its context / input after a blank line when there is one
        extra = fields.get("context" if name == "dolly" else "input", "").strip()
        prompt = fields["instruction"] + (f"\n\n{extra}" if extra else "")
        output = fields["response" if name == "dolly" else "output"]
    if not prompt.strip():
        raise BadRecord("empty prompt", f"empty prompt ({name} record): nothing to answer")
    if not output.strip():
        raise BadRecord("empty output", f"empty output ({name} record): nothing to train on")
    return {"input": prompt, "output": output, **rest}, name


def format_mismatch(row, present, fmt):
    """Why no format takes these fields: the nearest format's missing or unused field, the fields found, and the
    formats known."""
    known = "; ".join(
        f"{name} ({', '.join(sorted(req) + [f'[{o}]' for o in sorted(opt)])})"
        for name, (req, opt) in RECORD_FORMATS.items()
    )
    tried = [
        (len(req - present) + len(present - req - opt), name, req - present, present - req - opt)
        for name, (req, opt) in RECORD_FORMATS.items()
        if fmt in ("auto", name)
    ]
    _, name, missing, unused = min(tried, key=lambda t: t[0])
    why = (
        f"missing field '{sorted(missing)[0]}'"
        if missing and not unused
        else f"field '{sorted(unused)[0]}' is not used by the {name} format"
        if unused and not missing
        else f"its fields do not fit the {fmt} format that data.format asks for"
        if fmt != "auto"
        else "its fields fit no record format"
    )
    return f"{why}; fields found: {sorted(row)}; formats known (data.format): {known}"


def from_sharegpt(turns, system=None):
    """ShareGPT turns as OpenAI messages; LLaMA-Factory's variant: a function_call turn holds one tool call (or a
    list) as JSON, an observation turn its result, and the record's "system" field the system prompt."""
    if not isinstance(turns, list):
        raise BadRecord("bad conversation", f"'conversations' must be a list of turns, got {type(turns).__name__}")
    out = [{"role": "system", "content": system}] if system is not None else []
    for i, turn in enumerate(turns, start=1):
        turn = {k: v for k, v in turn.items() if v is not None} if isinstance(turn, dict) else turn
        if not isinstance(turn, dict) or set(turn) != {"from", "value"}:
            found = sorted(turn) if isinstance(turn, dict) else type(turn).__name__
            raise BadRecord("bad conversation", f"turn {i} must have exactly 'from' and 'value', got {found}")
        if turn["from"] not in SHAREGPT_ROLES:
            raise BadRecord(
                "bad conversation", f"turn {i}: unknown 'from' {turn['from']!r} (known: {sorted(SHAREGPT_ROLES)})"
            )
        if turn["from"] == "function_call":
            calls = json_field(turn["value"], f"turn {i} (function_call)")
            out.append({"role": "assistant", "tool_calls": calls if isinstance(calls, list) else [calls]})
        else:
            out.append({"role": SHAREGPT_ROLES[turn["from"]], "content": turn["value"]})
    return out


def conversational_prompt_completion(prompt, completion):
    """TRL's conversational prompt/completion as one conversation in which only the completion's assistant turns
    train, as TRL trains them: an assistant turn of the prompt is marked "train": false."""
    if not isinstance(completion, list):
        raise BadRecord("bad conversation", "'prompt' is a list of messages, so 'completion' must be one too")
    context = [dict(m, train=False) if isinstance(m, dict) and m.get("role") == "assistant" else m for m in prompt]
    return standard_conversation(context + completion)


def standard_conversation(messages, tools=None):
    """The checked conversation record (check_conversation) of messages as exports hold them: content given as a
    list of text parts joined (end to end, as templates that take parts render them), "thinking" as
    "reasoning_content", the older function role and function_call as tool and tool_calls, a tool call or tool
    schema without its {"type": "function"} wrapper wrapped, tools and arguments given as JSON strings parsed, and
    the nulls that a columnar file holds for the keys of other records dropped from tools and arguments."""
    if isinstance(tools, str):
        tools = json_field(tools, "'tools'")
    if isinstance(tools, list):
        tools = [as_function(without_nulls(t)) for t in tools]
    if isinstance(messages, list):
        messages = [standard_message(m, i) for i, m in enumerate(messages, start=1)]
    return check_conversation(messages, tools)


def standard_message(m, i):
    if not isinstance(m, dict):
        return m  # check_conversation names it
    m = {k: v for k, v in m.items() if v is not None}
    if m.get("role") == "function":  # OpenAI's older shape of a tool result
        m["role"] = "tool"
    if "thinking" in m and "reasoning_content" not in m:
        m["reasoning_content"] = m.pop("thinking")
    if "function_call" in m and "tool_calls" not in m:
        m["tool_calls"] = [m.pop("function_call")]
    if isinstance(m.get("content"), list):
        m["content"] = "".join(text_part(part, i, k) for k, part in enumerate(m["content"], start=1))
    if isinstance(m.get("tool_calls"), list):
        m["tool_calls"] = [tool_call(call, f"message {i}, tool call {k}") for k, call in enumerate(m["tool_calls"], 1)]
    return m


def text_part(part, i, k):
    if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
        return part["text"]
    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
    raise BadRecord("non-text part", f"message {i}: content part {k} is {kind!r}, not text; only text trains here")


def tool_call(call, where):
    """A tool call in the wrapper, its arguments an object: parsed when given as a JSON string."""
    call = as_function(call)
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict):
        return call  # check_conversation names it
    args = fn.get("arguments")
    args = json_field(args, f"{where}: 'arguments'") if isinstance(args, str) else without_nulls(args)
    return {**call, "function": {**without_nulls(fn), **({"arguments": args} if args is not None else {})}}


def as_function(x):
    """A function (a tool call or schema) as {"type": "function", "function": {...}}: a bare {"name", ...} (older
    exports, LLaMA-Factory) is wrapped, a wrapper without its "type" given it; anything else is left to the check."""
    if isinstance(x, dict) and "function" in x:
        return {"type": "function", **x}
    if isinstance(x, dict) and "name" in x:
        return {
            "type": "function",
            "function": {k: v for k, v in x.items() if k != "id"},
            **{k: x[k] for k in ["id"] if k in x},
        }
    return x


def without_nulls(x):
    if isinstance(x, dict):
        return {k: without_nulls(v) for k, v in x.items() if v is not None}
    return [without_nulls(v) for v in x] if isinstance(x, list) else x


def json_field(text, what):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise BadRecord("not valid JSON", f"{what} is not valid JSON ({e.msg} at column {e.colno})") from None


def check_conversation(messages, tools=None):
    """The record {"messages": [...], "tools": [...] (when given)} of a conversation, checked. A message holds its
    role, content and the keys MESSAGE_KEYS allows it: an assistant's "tool_calls" (which may stand for its content),
    "reasoning_content" and a boolean "train"; a tool result's "tool_call_id" and "name" (check_function for calls
    and tools). A system turn comes first if any, a user turn before the first assistant turn, a tool result after a
    tool call, no turn is empty, and an assistant turn that trains ends it."""

    def bad(why, kind="bad conversation"):
        return BadRecord(kind, why)

    if not isinstance(messages, list) or not messages:
        raise bad("a conversation must be a non-empty list of messages")
    # columnar files hold null for a key that some messages lack
    messages = [{k: v for k, v in m.items() if v is not None} if isinstance(m, dict) else m for m in messages]
    for i, m in enumerate(messages, start=1):
        role = m.get("role") if isinstance(m, dict) else f"none: a {type(m).__name__}, not an object"
        if role not in MESSAGE_KEYS:
            raise bad(f"message {i}: unknown role {role!r} (known: {', '.join(MESSAGE_KEYS)})")
        allowed, previous = MESSAGE_KEYS[role].split(), messages[i - 2] if i > 1 else {}
        if not set(m) - {"role", "content"} <= set(allowed) or not {"content", "tool_calls"} & set(m):
            raise bad(
                f"message {i} ({role}) must have 'content', and may have {allowed or 'nothing else'}: {sorted(m)}"
            )
        for key in ("content", "reasoning_content", "tool_call_id", "name"):
            if not isinstance(m.get(key, ""), str):
                raise bad(f"message {i}: {key} must be a string, got {type(m[key]).__name__}")
        if not (m.get("content", "").strip() or m.get("tool_calls") or role == "tool"):
            raise bad(f"message {i} ({role}) is empty", "empty turn")
        if role == "system" and i != 1:
            raise bad(f"message {i}: a system message may only come first")
        if role == "tool" and previous.get("role") != "tool" and "tool_calls" not in previous:
            raise bad(f"message {i}: a tool result must follow a tool call or a result")
        if not isinstance(m.get("train", True), bool):
            raise bad(f"message {i}: 'train' must be true or false")
        calls = m.get("tool_calls", [])  # a list of one call or more
        for k, call in enumerate(calls if isinstance(calls, list) and (calls or "tool_calls" not in m) else [calls], 1):
            check_function(call, f"message {i}: tool call {k}", {"id"})
    if not isinstance(tools, list | None):
        raise bad(f"'tools' must be a list of tool schemas, got {type(tools).__name__}", "bad tool")
    for k, tool in enumerate(tools or [], start=1):
        check_function(tool, f"'tools' item {k}", set())
    roles = [m["role"] for m in messages]
    if "assistant" not in roles:
        raise bad("a conversation without an assistant turn has nothing to train on", "no assistant turn")
    if roles[-1] != "assistant":
        raise bad(f"the conversation ends on a {roles[-1]} turn, after its last answer", "ends on a user turn")
    if next(r for r in roles if r != "system") != "user":
        raise bad("the first turn after the system message must be the user's")
    if not any(m["role"] == "assistant" and m.get("train", True) for m in messages):
        raise bad('every assistant turn has "train": false: nothing to train on', "no assistant turn")
    return {"messages": [dict(m) for m in messages], **({"tools": tools} if tools is not None else {})}


def check_function(x, where, keys):
    """A tool call or schema: {"type": "function", "function": {"name": str, ...}}, arguments an object, or `keys`."""
    fn = x.get("function") if isinstance(x, dict) else None
    shaped = isinstance(fn, dict) and x.get("type") == "function" and set(x) <= {"type", "function", *keys}
    if not (shaped and isinstance(fn.get("name"), str) and fn["name"] and isinstance(fn.get("arguments", {}), dict)):
        shape = '{"type": "function", "function": {"name": ..., "arguments": {...}}}'
        raise BadRecord("bad tool", f"{where} must be {shape}, got {json.dumps(x, default=str)[:160]}")


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


# ------------------------------------------------------------------------------------------------ entry point
if __name__ == "__main__":
    try:
        main()
    except StageError as e:
        sys.exit(f"error: {e}")
