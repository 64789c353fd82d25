#!/usr/bin/env python3
"""Benchmark of stage 05's data preparation at scale: time and peak memory of a launch on 100k and 1M records,
prepared the first time and reused by a relaunch, against the in-memory path 05 had before (one record at a
time, every window held as int64 tensors in every process), measured in the same run.

    python bench/data_bench.py [--sizes 100000,1000000] [--before 4cfc596] [--work work/bench/data]
    python bench/data_bench.py --conversations 100000
    python bench/data_bench.py --tool-calls 100000

--conversations N times the first preparation of N multi-turn conversations (a system message and one to four
exchanges; user turns of 10-120 words, answers of 5-80, log-uniform) against single-turn records holding the
same texts (the system and user turns joined as the prompt, the answers as the response), in the raw and the
chat_template layouts, with a Llama-3-style chat template on the same tokenizer; each a launch of
`05_train.py --inspect-data 1`. Throughput is in tokens of the prepared documents per second, so the rows
compare equal work although the templates add different scaffolding.

--tool-calls N does the same for N agent conversations (a tools list of one to three JSON-schema functions, a user
turn, an assistant turn calling one of them, with reasoning in half of them, the tool's result, and the answer),
against single-turn records of the same texts (tools, user turn and result as the prompt; reasoning, call and
answer as the response), with a Hermes-style tool template (tools in the system turn, calls in <tool_call> tags,
reasoning in <think> tags).

Data: synthetic instruction records with dolly-like lengths (prompts of 20-300 words, answers of 5-200, both
log-uniform, so most records are short and a few long, as in dolly-15k), words drawn from a Zipf law over a
made-up lexicon. Tokenizer: byte-level BPE with Llama 3's vocabulary size (128,256), pre-tokenizer pattern and
whole-word lookup (ignore_merges), trained on 20k of these records. Settings: the tutorial's (raw format,
seq_length 4096, packing, every record).

Each measurement is a real launch of 05_train.py: `--inspect-data 1` (settings, tokenizer, data; no model) for
one process, and a launch of the training run of a tiny model (vocabulary 128,256) under torchrun with 4
data-parallel ranks up to its first step (trainer.max_steps=0: the data prepared or mapped, the process group,
the model loaded; the step's own memory is the model's business, not the data's). Peak resident memory: the
process's own high-water mark (VmHWM); memory-mapped token files count only
for the pages a process touched, and those are shared through the page cache. The tokenizer's own throughput on
the same records (batched calls, all cores) is printed for context: it bounds how fast any preparation can be.
The before-path runs the 05_train.py of commit --before (read with git show).
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 128256
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


# ------------------------------------------------------------------------------------------------ inputs
def lexicon(rng, n=300_000):
    """n made-up words of one to four syllables, most frequent first."""
    onsets = list("bcdfghjklmnprstvwz") + ["ch", "sh", "th", "st", "tr", "br", "pl"]
    vowels = ["a", "e", "i", "o", "u", "ai", "ea", "ou", "y"]
    words = set()
    while len(words) < n:
        syllables = rng.integers(1, 5)
        words.add(
            "".join(onsets[rng.integers(len(onsets))] + vowels[rng.integers(len(vowels))] for _ in range(syllables))
        )
    return np.array(sorted(words, key=len))


def zipf_lexicon(rng):
    """The made-up lexicon and the probability of each word under a Zipf law (exponent 1.07)."""
    words = lexicon(rng)
    p = 1.0 / np.arange(1, len(words) + 1) ** 1.07
    return words, p / p.sum()


def log_uniform(rng, lo, hi, n):
    return np.exp(rng.uniform(np.log(lo), np.log(hi + 1), size=n)).astype(np.int64)


def write_records(path, n, seed=0):
    """n synthetic records as jsonl, made 10,000 at a time."""
    if path.exists():
        return path
    rng = np.random.default_rng(seed)
    words, p = zipf_lexicon(rng)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        for first in range(0, n, 10_000):
            m = min(10_000, n - first)
            texts = []
            for lo, hi in ((20, 300), (5, 200)):
                lengths = log_uniform(rng, lo, hi, m)
                drawn = words[rng.choice(len(words), size=int(lengths.sum()), p=p)]
                ends = np.cumsum(lengths)
                texts.append([" ".join(drawn[e - k : e]) + "." for e, k in zip(ends, lengths)])
            f.writelines(json.dumps({"input": a + "\n", "output": b}) + "\n" for a, b in zip(*texts))
    tmp.rename(path)
    return path


def write_conversations(work, n, seed=2):
    """n conversations (jsonl) and the same texts as n single-turn records (jsonl), made 10,000 at a time;
    returns both paths."""
    conv_path, single_path = work / f"conversations-{n}.jsonl", work / f"conversations-{n}-single.jsonl"
    if conv_path.exists() and single_path.exists():
        return conv_path, single_path
    rng = np.random.default_rng(seed)
    words, p = zipf_lexicon(rng)

    def sentences(lo, hi, m):
        lengths = log_uniform(rng, lo, hi, m)
        drawn, ends = words[rng.choice(len(words), size=int(lengths.sum()), p=p)], np.cumsum(lengths)
        return iter(" ".join(drawn[e - k : e]) + "." for e, k in zip(ends, lengths))

    with open(conv_path, "w") as conv_f, open(single_path, "w") as single_f:
        for first in range(0, n, 10_000):
            turns = rng.integers(1, 5, size=min(10_000, n - first))
            systems, users, answers = (
                sentences(5, 30, len(turns)),
                sentences(10, 120, int(turns.sum())),
                sentences(5, 80, int(turns.sum())),
            )
            for k in turns:
                system, asked, said = next(systems), [next(users) for _ in range(k)], [next(answers) for _ in range(k)]
                messages = [{"role": "system", "content": system}]
                for u, a in zip(asked, said):
                    messages += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
                conv_f.write(json.dumps({"messages": messages}) + "\n")
                single_f.write(json.dumps({"input": "\n".join([system, *asked]), "output": "\n".join(said)}) + "\n")
    return conv_path, single_path


def write_tool_calls(work, n, seed=3):
    """n tool-call conversations (jsonl, 01's normalized shape) and the same texts as n single-turn records (jsonl),
    made 10,000 at a time; returns both paths."""
    conv_path, single_path = work / f"tool-calls-{n}.jsonl", work / f"tool-calls-{n}-single.jsonl"
    if conv_path.exists() and single_path.exists():
        return conv_path, single_path
    rng = np.random.default_rng(seed)
    words, p = zipf_lexicon(rng)
    pool, drawn = words[rng.choice(len(words), size=5_000_000, p=p)], [0]  # drawn once, used in turn

    def take(k):
        start = drawn[0] % (len(pool) - k)
        drawn[0] = start + k
        return [str(w) for w in pool[start : start + k]]

    def text(lo, hi):
        return " ".join(take(int(log_uniform(rng, lo, hi, 1)[0]))) + "."

    def function():
        names = sorted(set(take(int(rng.integers(1, 4)))))
        properties = {name: {"type": "string", "description": text(3, 12)} for name in names}
        schema = {"type": "object", "properties": properties, "required": names}
        return {
            "type": "function",
            "function": {"name": "_".join(take(2)), "description": text(5, 25), "parameters": schema},
        }

    with open(conv_path, "w") as conv_f, open(single_path, "w") as single_f:
        for _ in range(n):
            tools = [function() for _ in range(int(rng.integers(1, 4)))]
            chosen = tools[int(rng.integers(len(tools)))]["function"]
            arguments = {k: text(1, 6) for k in chosen["parameters"]["properties"]}
            call = {"type": "function", "function": {"name": chosen["name"], "arguments": arguments}}
            asked, result, answer = text(10, 120), text(5, 60), text(5, 80)
            assistant = {"role": "assistant", "tool_calls": [call]}
            if rng.random() < 0.5:
                assistant["reasoning_content"] = text(10, 60)
            messages = [
                {"role": "user", "content": asked},
                assistant,
                {"role": "tool", "content": result},
                {"role": "assistant", "content": answer},
            ]
            conv_f.write(json.dumps({"messages": messages, "tools": tools}) + "\n")
            prompt = "\n".join([json.dumps(tools), asked, result])
            response = "\n".join([assistant.get("reasoning_content", ""), json.dumps(call["function"]), answer])
            single_f.write(json.dumps({"input": prompt, "output": response}) + "\n")
    return conv_path, single_path


TOOL_TEMPLATE = (  # Hermes-style, on the benchmark tokenizer's reserved special tokens
    "{{ bos_token }}{% if tools %}<|reserved_special_token_0|>system<|reserved_special_token_1|>\n\n# Tools\n"
    "{% for t in tools %}{{ t | tojson }}\n{% endfor %}<|reserved_special_token_2|>{% endif %}"
    "{% for m in messages %}<|reserved_special_token_0|>{{ m['role'] }}<|reserved_special_token_1|>\n\n"
    "{% if m.reasoning_content %}<think>{{ m.reasoning_content }}</think>{% endif %}{{ m.content or '' }}"
    "{% for c in m.tool_calls or [] %}<tool_call>{{ c.function | tojson }}</tool_call>{% endfor %}"
    "<|reserved_special_token_2|>{% endfor %}{% if add_generation_prompt %}"
    "<|reserved_special_token_0|>assistant<|reserved_special_token_1|>\n\n{% endif %}"
)


LLAMA3_STYLE_TEMPLATE = (  # Llama 3's layout, on the benchmark tokenizer's reserved special tokens
    "{{ bos_token }}{% for m in messages %}<|reserved_special_token_0|>{{ m['role'] }}<|reserved_special_token_1|>"
    "\n\n{{ m['content'] }}<|reserved_special_token_2|>{% endfor %}{% if add_generation_prompt %}"
    "<|reserved_special_token_0|>assistant<|reserved_special_token_1|>\n\n{% endif %}"
)


def conversation_rows(work, n, tokenizer_dir, ckpt, tools=False):
    """Time the first preparation of conversations (with tools: tool-call conversations) and of the same texts as
    single-turn records."""
    from transformers import AutoTokenizer

    chat_tok = work / ("tokenizer-tools" if tools else "tokenizer-chat")
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    tok.chat_template = TOOL_TEMPLATE if tools else LLAMA3_STYLE_TEMPLATE
    tok.save_pretrained(str(chat_tok))
    conv_path, single_path = (write_tool_calls if tools else write_conversations)(work, n)
    rows = []
    for label, data, fmt in (
        ("single-turn, raw", single_path, "raw"),
        ("single-turn, chat_template", single_path, "chat_template"),
        ("tool-call conversations" if tools else "conversations (chat template)", conv_path, "raw"),
    ):
        cache = work / f"prepared-conv-{fmt}-{data.stem}"
        subprocess.run(["rm", "-rf", str(cache)], check=True)
        overlay = write_overlay(
            work / "conv.yaml",
            {
                "trainer": {"accelerator": "cpu"},
                "distributed_strategy": {"tensor_model_parallel_size": 1, "kv_replicator": 1},
                "data": {
                    "train_dir": str(data),
                    "val_dir": None,
                    "dev_choose_samples": None,
                    "seq_length": 4096,
                    "prompt_format": fmt,
                    "tokenizer": {"type": str(chat_tok)},
                    "cache_dir": str(cache),
                },
                "model": {"model_config": str(work / "config.json")},
                "exp_manager": {"resume_from_checkpoint": str(ckpt)},
            },
        )
        seconds, peaks, _ = launch(
            [sys.executable, "05_train.py", "--config", "config.yaml", "--config", str(overlay), "--inspect-data", "1"]
        )
        stats = json.loads(next(cache.glob("*.prepared/*/prepared.json")).read_text())["stats"]
        rows.append((label, seconds, stats["tokens"], stats["supervised"], max(peaks.values())))
    print(f"\n{n:,} records, first preparation (one process, `05_train.py --inspect-data 1`):\n")
    print(
        "| records | prepared tokens | trained tokens | time (s) | tokens/s | single-turn raw / this | peak RSS (GiB) |"
    )
    print("|---|---|---|---|---|---|---|")
    base = rows[0][2] / rows[0][1]
    for label, seconds, tokens, supervised, gib in rows:
        rate = tokens / seconds
        print(
            f"| {label} | {tokens:,} | {supervised:,} | {seconds:.1f} | {rate:,.0f} | {base / rate:.2f}x | {gib:.2f} |"
        )


def make_tokenizer(out, sample):
    """A byte-level BPE tokenizer with Llama 3's vocabulary size, trained on the sample records."""
    if (out / "tokenizer.json").exists():
        return out
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_PATTERN), "isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    special = ["<|begin_of_text|>", "<|end_of_text|>"] + [f"<|reserved_special_token_{i}|>" for i in range(254)]
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=special,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )

    def texts():
        with open(sample) as f:
            for line in f:
                r = json.loads(line)
                yield r["input"]
                yield r["output"]

    tok.train_from_iterator(texts(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>")
    fast.save_pretrained(str(out))
    return out


def make_model(work, tokenizer_dir):
    """A tiny random Llama with the benchmark's tokenizer, converted by stage 03 (TP 1)."""
    ckpt = work / "ckpt"
    if (ckpt / "manifest.json").exists():
        return ckpt
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hf = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=4096,
            bos_token_id=0,
            eos_token_id=1,
        )
    )
    hf.save_pretrained(str(work / "hf"))
    AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(str(work / "hf"))
    overlay = write_overlay(
        work / "model.yaml",
        {
            "model": {
                "download": {"source": str(work / "hf")},
                "model_config": str(work / "config.json"),
                "hf_weights_dir": str(work / "hf_weights"),
            },
            "exp_manager": {"resume_from_checkpoint": str(ckpt)},
            "distributed_strategy": {"tensor_model_parallel_size": 1, "kv_replicator": 1},
        },
    )
    for stage in ("02_download_model.py", "03_convert_checkpoint.py"):
        proc = subprocess.run(
            [
                sys.executable,
                stage,
                "--config",
                "config.yaml",
                "--config",
                str(overlay),
                f"data.tokenizer.type={work / 'unused-tokenizer'}",
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        if proc.returncode:
            raise SystemExit(f"{stage} failed:\n{proc.stderr[-2000:]}")
    return ckpt


def write_overlay(path, nested):
    path.write_text(json.dumps(nested))
    return path


# ------------------------------------------------------------------------------------------------ measuring
def descendants(root):
    """{pid: parent} of the processes below `root`."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents[int(stat.parent.name)] = int(fields[1])
        except (OSError, IndexError, ValueError):
            continue
    below, grew = {root}, True
    while grew:
        new = {pid for pid, ppid in parents.items() if ppid in below and pid not in below}
        below |= new
        grew = bool(new)
    return below - {root}


def high_water_gib(pid):
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        return None


def launch(cmd, env=None):
    """Run a command; returns (seconds, {pid: peak resident GiB} of it and every process below it, output)."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=dict(os.environ, OMP_NUM_THREADS="1", **(env or {})),
    )
    peaks, names = {}, {}
    out = []
    import threading

    reader = threading.Thread(target=lambda: out.extend(proc.stdout), daemon=True)
    reader.start()
    while proc.poll() is None:
        for pid in descendants(proc.pid) | {proc.pid}:
            hwm = high_water_gib(pid)
            if hwm is not None:
                peaks[pid] = max(peaks.get(pid, 0.0), hwm)
                if pid not in names:
                    try:
                        names[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:3]
                    except OSError:
                        names[pid] = []
        time.sleep(0.1)
    reader.join()
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{''.join(out)[-4000:]}")
    workers = {
        pid: gib
        for pid, gib in peaks.items()
        if any(b"05_train.py" in part or b"05_before.py" in part for part in names.get(pid, []))
    }
    return seconds, workers, "".join(out)


def tokenizer_rate(tokenizer_dir, sample, n=20_000):
    """Tokens/s of the tokenizer alone on the first n records (batched calls of 2048, all cores)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    texts = []
    with open(sample) as f:
        for line, _ in zip(f, range(n)):
            r = json.loads(line)
            texts += [r["input"], r["output"]]
    start, count = time.perf_counter(), 0
    for i in range(0, len(texts), 2048):
        count += sum(map(len, tok(texts[i : i + 2048], add_special_tokens=False)["input_ids"]))
    return count / (time.perf_counter() - start), count / n


# ------------------------------------------------------------------------------------------------ main
def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="100000,1000000", help="record counts")
    ap.add_argument("--before", default="4cfc596", help="commit whose 05_train.py is the in-memory reference")
    ap.add_argument("--before-max", type=int, default=200_000, help="largest size the reference is run at")
    ap.add_argument("--work", default=str(ROOT / "work" / "bench" / "data"))
    ap.add_argument("--conversations", type=int, metavar="N", help="only the conversation benchmark, on N records")
    ap.add_argument("--tool-calls", type=int, metavar="N", help="only the tool-call benchmark, on N records")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    sizes = [int(s) for s in args.sizes.split(",")]

    command = (
        f"--conversations {args.conversations}"
        if args.conversations
        else f"--tool-calls {args.tool_calls}"
        if args.tool_calls
        else f"--sizes {args.sizes}"
    )
    print(
        f"# {time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPU(s), {os.uname().machine}; python bench/data_bench.py "
        f"{command}"
    )
    sample = write_records(work / "sample-20000.jsonl", 20_000, seed=1)
    tokenizer_dir = make_tokenizer(work / "tokenizer", sample)
    ckpt = make_model(work, tokenizer_dir)
    rate, per_record = tokenizer_rate(tokenizer_dir, sample)
    print(
        f"tokenizer alone (vocabulary {VOCAB:,}, batched, all cores): {rate / 1e6:.2f}M tokens/s; "
        f"{per_record:.0f} tokens per record on average\n"
    )
    if args.conversations or args.tool_calls:
        conversation_rows(work, args.conversations or args.tool_calls, tokenizer_dir, ckpt, tools=bool(args.tool_calls))
        return
    before = work / "05_before.py"
    before.write_text(
        subprocess.run(
            ["git", "show", f"{args.before}:05_train.py"], cwd=ROOT, check=True, capture_output=True, text=True
        ).stdout
    )

    rows = []
    for n in sizes:
        data = write_records(work / f"records-{n}.jsonl", n)
        cache = work / f"prepared-{n}"
        overlay = write_overlay(
            work / f"run-{n}.yaml",
            {
                "trainer": {"accelerator": "cpu", "max_steps": 0},
                "distributed_strategy": {"tensor_model_parallel_size": 1, "kv_replicator": 1},
                "data": {
                    "train_dir": str(data),
                    "val_dir": None,
                    "dev_choose_samples": None,
                    "seq_length": 4096,
                    "micro_batch_size": 1,
                    "global_batch_size": 4,
                    "tokenizer": {"type": str(tokenizer_dir)},
                    "cache_dir": str(cache),
                },
                "model": {"model_config": str(work / "config.json")},
                "exp_manager": {
                    "resume_from_checkpoint": str(ckpt),
                    "explicit_log_dir": str(work / f"run-{n}"),
                    "checkpoint_callback_params": {"every_n_train_steps": 0},
                },
                "evaluation": {"generate": {"num_prompts": 0}},
            },
        )
        config = ["--config", "config.yaml", "--config", str(overlay)]
        if n <= args.before_max:
            s, peaks, _ = launch([sys.executable, str(before), *config, "--inspect-data", "1"])
            rows.append((n, "before: in memory, one record at a time", "1", s, None, max(peaks.values())))
            subprocess.run(["rm", "-rf", str(work / f"run-{n}")], check=True)
            s, peaks, _ = launch(
                [
                    sys.executable,
                    "-m",
                    "torch.distributed.run",
                    "--standalone",
                    "--nproc_per_node=4",
                    str(before),
                    *config,
                ]
            )
            rows.append(
                (
                    n,
                    "before, 4 ranks (per rank: "
                    + ", ".join(f"{g:.2f}" for g in sorted(peaks.values(), reverse=True))
                    + ")",
                    "4",
                    s,
                    None,
                    max(peaks.values()),
                )
            )
        subprocess.run(["rm", "-rf", str(cache)], check=True)
        s1, p1, out = launch([sys.executable, "05_train.py", *config, "--inspect-data", "1"])
        s2, p2, _ = launch([sys.executable, "05_train.py", *config, "--inspect-data", "1"])
        summary = next(line for line in out.splitlines() if line.startswith("train: ") and " records -> " in line)
        rows.append((n, "prepared once, memory-mapped", "1", s1, s2, max(list(p1.values()) + list(p2.values()))))
        torchrun = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=4",
            "05_train.py",
            *config,
        ]
        subprocess.run(["rm", "-rf", str(cache), str(work / f"run-{n}")], check=True)
        s3, p3, _ = launch(torchrun)
        subprocess.run(["rm", "-rf", str(work / f"run-{n}")], check=True)
        s4, p4, _ = launch(torchrun)
        ranks = ", ".join(f"{g:.2f}" for g in sorted(p3.values(), reverse=True))
        rows.append(
            (
                n,
                f"4 ranks, data and model loaded (per rank: {ranks} | "
                f"{', '.join(f'{g:.2f}' for g in sorted(p4.values(), reverse=True))})",
                "4",
                s3,
                s4,
                max(list(p3.values()) + list(p4.values())),
            )
        )
        print(f"{n:,} records: {summary.split(': ', 1)[1]}", flush=True)

    print("\n| records | path | processes | first launch (s) | relaunch (s) | peak RSS per process (GiB) |")
    print("|---|---|---|---|---|---|")
    for n, path, procs, s1, s2, gib in rows:
        relaunch = f"{s2:.1f}" if s2 is not None else "same (nothing kept)"
        print(f"| {n:,} | {path} | {procs} | {s1:.1f} | {relaunch} | {gib:.2f} |")
    for n in sizes:
        old = next((r for r in rows if r[0] == n and r[1].startswith("before")), None)
        new = next(r for r in rows if r[0] == n and r[1].startswith("prepared"))
        if old:
            print(
                f"{n:,} records, before / now: first launch {old[3] / new[3]:.1f}x, relaunch {old[3] / new[4]:.1f}x, "
                f"peak memory {old[5] / new[5]:.1f}x"
            )


if __name__ == "__main__":
    main()
