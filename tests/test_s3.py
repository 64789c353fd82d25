"""Stage 01 against a real S3-compatible server (moto's server mode) on 127.0.0.1, read with unsigned requests."""

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
from conftest import ROOT, run_stage, write_overlay

BUCKET = "neuron-s3"
BIG_KEY = "training_datasets/llama/sft/training.jsonl"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(port, seconds=30):
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")


class SlowProxy:
    """A TCP relay that delays every chunk the server sends: a slow network, so a download can be killed
    part-way at a known point."""

    def __init__(self, upstream_port, delay=0.004):
        self.upstream, self.delay = upstream_port, delay
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self):
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.upstream))
            threading.Thread(target=self.pump, args=(client, server, 0), daemon=True).start()
            threading.Thread(target=self.pump, args=(server, client, self.delay), daemon=True).start()

    def pump(self, src, dst, delay):
        try:
            while data := src.recv(65536):
                time.sleep(delay)
                dst.sendall(self.relayed(data))
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def relayed(self, data):
        """What the relay passes on for a chunk it received."""
        return data


class CorruptingProxy(SlowProxy):
    """A relay that flips one byte in the body of the first ranged-GET response (206) it passes on: a part that
    arrives corrupted, whether in transit or as the store served it."""

    def __init__(self, upstream_port):
        self.corrupted, self.stream = threading.Event(), threading.local()
        super().__init__(upstream_port, delay=0)

    def relayed(self, data):
        if self.corrupted.is_set():
            return data
        body = getattr(self.stream, "body", None)  # where in this chunk a 206 response's body starts
        if data.startswith(b"HTTP/1.1 206") and b"\r\n\r\n" in data:
            body = data.find(b"\r\n\r\n") + 4
        if body is not None and body < len(data):
            self.corrupted.set()
            return data[:body] + bytes([data[body] ^ 0x01]) + data[body + 1 :]
        self.stream.body = 0 if body is not None else None  # the headers ended this chunk: the body starts the next
        return data


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """moto's S3 server on loopback with public-read objects; yields (endpoint, admin client, big file bytes)."""
    import boto3
    from boto3.s3.transfer import TransferConfig

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(port)
        endpoint = f"http://127.0.0.1:{port}"
        admin = boto3.client(
            "s3", endpoint_url=endpoint, aws_access_key_id="test", aws_secret_access_key="test", region_name="us-east-1"
        )
        admin.create_bucket(Bucket=BUCKET)
        lines, size = [], 0
        demo = [json.loads(x) for x in (ROOT / "demo" / "data" / "train.jsonl").read_text().splitlines()]
        while size < 21 * 2**20:  # > 20 MB, uploaded in three 8 MiB parts
            r = demo[len(lines) % len(demo)]
            line = json.dumps({"input": f"[{len(lines)}] " + r["input"], "output": r["output"]}) + "\n"
            lines.append(line)
            size += len(line.encode())
        big = "".join(lines).encode()
        path = tmp_path_factory.mktemp("s3") / "big.jsonl"
        path.write_bytes(big)
        admin.upload_file(
            str(path),
            BUCKET,
            BIG_KEY,
            ExtraArgs={"ACL": "public-read"},
            Config=TransferConfig(multipart_threshold=8 * 2**20, multipart_chunksize=8 * 2**20),
        )
        small = (ROOT / "demo" / "data" / "val.jsonl").read_bytes()
        for key in ("shards/part-b.jsonl", "shards/part-a.jsonl", "evil/../../escape.jsonl"):
            admin.put_object(Bucket=BUCKET, Key=key, Body=small, ACL="public-read")
        admin.put_object(Bucket=BUCKET, Key="private/training.jsonl", Body=small)  # no public-read
        yield endpoint, port, big
    finally:
        proc.terminate()
        proc.wait(10)


def args(tmp_path, uri, **extra):
    values = {
        "data.download.train_uri": uri,
        "data.download.val_uri": None,
        "data.val_dir": None,
        "data.train_dir": str(tmp_path / "out" / "training.jsonl"),
    }
    values.update(extra)
    return [
        "01_download_data.py",
        "--config",
        "config.yaml",
        "--config",
        str(write_overlay(tmp_path / "o.yaml", values)),
    ]


def env_for(endpoint):
    return dict(os.environ, AWS_ENDPOINT_URL=endpoint, AWS_EC2_METADATA_DISABLED="true")


def manifest(tmp_path):
    return json.loads((tmp_path / "out" / "training.jsonl.manifest.json").read_text())


def test_a_multipart_object_arrives_byte_identical_through_ranged_parts(tmp_path, s3):
    endpoint, _, big = s3
    proc = run_stage(
        args(tmp_path, f"s3://{BUCKET}/{BIG_KEY}", **{"data.download.part_size_mb": 1}), env=env_for(endpoint)
    )
    m = manifest(tmp_path)
    assert m["source_sha256"] == hashlib.sha256(big).hexdigest()
    assert m["source_objects"][0]["etag"].endswith("-3") and m["source_objects"][0]["etag_verified"] is True
    assert (tmp_path / "out" / "training.jsonl").read_bytes() == big  # records re-serialized identically
    assert m["records"] == big.count(b"\n") and "resuming" not in proc.stdout


def test_a_killed_download_resumes_without_starting_over(tmp_path, s3):
    endpoint, port, big = s3
    proxy = SlowProxy(port)
    stage = args(tmp_path, f"s3://{BUCKET}/{BIG_KEY}", **{"data.download.part_size_mb": 1, "data.download.workers": 1})
    state = tmp_path / "out" / ".training.jsonl.download" / "training.jsonl.state.json"
    proc = subprocess.Popen(
        [sys.executable, *stage],
        cwd=ROOT,
        env=env_for(f"http://127.0.0.1:{proxy.port}"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline, done = time.time() + 60, []
    while time.time() < deadline and len(done) < 3:
        try:
            done = json.loads(state.read_text())["done"]
        except (OSError, ValueError):
            pass
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n_parts = -(-len(big) // 2**20)
    killed_with = len(json.loads(state.read_text())["done"])
    assert 3 <= killed_with < n_parts, "the kill must land part-way"
    assert not (tmp_path / "out" / "training.jsonl").exists()
    out = run_stage(stage, env=env_for(endpoint)).stdout
    assert f"resuming, {killed_with} of {n_parts} parts already downloaded" in out
    assert manifest(tmp_path)["source_sha256"] == hashlib.sha256(big).hexdigest()


@pytest.mark.parametrize("key", [BIG_KEY, "shards/part-a.jsonl"], ids=["multipart", "single-part"])
def test_a_part_that_arrives_corrupted_fails_the_etag_check_and_leaves_nothing(tmp_path, s3, key):
    endpoint, port, _ = s3
    proxy = CorruptingProxy(port)
    stage = args(tmp_path, f"s3://{BUCKET}/{key}", **{"data.download.part_size_mb": 1})
    proc = run_stage(stage, env=env_for(f"http://127.0.0.1:{proxy.port}"), check=False)
    assert proxy.corrupted.is_set()
    # Caught by the ETag (multipart: the upload's part size comes from a PartNumber=1 HEAD) or, for an object
    # stored with a checksum, already by botocore's check of that response.
    assert proc.returncode == 1 and "arrived corrupted" in proc.stderr, proc.stderr
    out = tmp_path / "out"
    assert not (out / "training.jsonl").exists() and not (out / "training.jsonl.manifest.json").exists()
    # Nothing of the bad bytes is kept for a resume: the next run, over a sound connection, gets the object right.
    assert "resuming" not in run_stage(stage, env=env_for(endpoint)).stdout
    assert manifest(tmp_path)["source_objects"][0]["etag_verified"] is True


def test_a_rerun_with_everything_verified_does_nothing(tmp_path, s3):
    endpoint, _, _ = s3
    stage = args(tmp_path, f"s3://{BUCKET}/shards/part-a.jsonl")
    run_stage(stage, env=env_for(endpoint))
    assert "up to date" in run_stage(stage, env=env_for(endpoint)).stdout


def test_a_prefix_downloads_every_object_in_key_order(tmp_path, s3):
    endpoint, _, _ = s3
    run_stage(args(tmp_path, f"s3://{BUCKET}/shards/"), env=env_for(endpoint))
    m = manifest(tmp_path)
    assert [o["key"] for o in m["source_objects"]] == ["shards/part-a.jsonl", "shards/part-b.jsonl"]
    assert m["records"] == 400 and m["duplicates"] == 200


@pytest.mark.parametrize(
    "uri,message",
    [
        (f"s3://{BUCKET}/private/training.jsonl", "this object needs credentials: set data.download.anonymous: false"),
        (f"s3://{BUCKET}/no/such/key.jsonl", "no such object"),
        ("s3://no-such-bucket-here/training.jsonl", "no such bucket 'no-such-bucket-here'"),
    ],
    ids=["403", "404", "bad-bucket"],
)
def test_s3_errors_name_the_uri_and_the_fix(tmp_path, s3, uri, message):
    endpoint, _, _ = s3
    proc = run_stage(args(tmp_path, uri), env=env_for(endpoint), check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith(f"error: {uri}:") and message in proc.stderr


def test_a_key_that_escapes_the_destination_is_refused(tmp_path, s3):
    endpoint, _, _ = s3
    proc = run_stage(args(tmp_path, f"s3://{BUCKET}/evil/"), env=env_for(endpoint), check=False)
    assert proc.returncode == 1 and "would escape the destination directory; refused" in proc.stderr
    assert not (tmp_path / "escape.jsonl").exists() and not (tmp_path / "out" / "escape.jsonl").exists()


def test_an_unreachable_endpoint_is_explained(tmp_path):
    proc = run_stage(
        args(tmp_path, f"s3://{BUCKET}/x.jsonl"), env=env_for(f"http://127.0.0.1:{free_port()}"), check=False
    )
    assert proc.returncode == 1 and "cannot reach the S3 endpoint" in proc.stderr


def test_signed_requests_read_a_private_object_with_credentials(tmp_path, s3):
    endpoint, _, _ = s3
    secret = "s3cr3t-Zq7Zq7Zq7"
    env = dict(
        env_for(endpoint), AWS_ACCESS_KEY_ID="AKIDTEST", AWS_SECRET_ACCESS_KEY=secret, AWS_DEFAULT_REGION="us-east-1"
    )
    uri = f"s3://{BUCKET}/private/training.jsonl"
    proc = run_stage(args(tmp_path, uri, **{"data.download.anonymous": False}), env=env)
    assert manifest(tmp_path)["records"] == 200
    written = "".join(p.read_text() for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert secret not in written + proc.stdout + proc.stderr
