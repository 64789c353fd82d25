"""Greedy generation with the KV cache gives what transformers' greedy generate gives, one prompt at a time, and
05 writes each prompt with its answer and the expected one."""

import json

import torch
from conftest import tiny_llama, train
from transformers import AutoTokenizer, LlamaForCausalLM


def head(path, n):
    return [json.loads(line) for line in path.read_text().splitlines()[:n]]


def test_batched_cached_greedy_decoding_matches_transformers(train_mod, tokenizer_dir, tmp_path):
    model, hf = tiny_llama(train_mod, tmp_path, tokenizer_dir, num_key_value_heads=2)
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, 300, (n,), generator=g).tolist() for n in (5, 11, 8)]  # uneven: left padding
    ours = train_mod.generate(model, prompts, 7, stop_ids={1}, pad_id=2, device=torch.device("cpu"), autocast=False)
    for prompt, got in zip(prompts, ours):
        with torch.no_grad():
            out = hf.generate(
                torch.tensor([prompt]), max_new_tokens=7, do_sample=False, eos_token_id=1, pad_token_id=2
            )[0, len(prompt) :].tolist()
        expected = out[: out.index(1)] if 1 in out else out
        assert got == expected


def test_generation_stops_at_a_stop_token(train_mod, tokenizer_dir, tmp_path):
    model, _ = tiny_llama(train_mod, tmp_path, tokenizer_dir)
    prompt = [5, 6, 7]
    free = train_mod.generate(model, [prompt], 6, stop_ids=set(), pad_id=2, device=torch.device("cpu"), autocast=False)[
        0
    ]
    stopped = train_mod.generate(
        model, [prompt], 6, stop_ids={free[2]}, pad_id=2, device=torch.device("cpu"), autocast=False
    )[0]
    assert len(free) == 6 and stopped == free[: free.index(free[2])]


def test_generation_writes_each_prompt_its_greedy_answer_stopped_at_eos_and_the_expected_one(pipeline):
    """At step 0 (LoRA B = 0) the answers are the base model's greedy continuations, as transformers' generate
    gives them one prompt at a time, stopped at EOS (which never appears in the answer)."""
    work, overlay = pipeline
    metrics = train(
        work,
        overlay,
        "gen",
        "trainer.max_steps=0",
        "evaluation.generate.num_prompts=3",
        "evaluation.generate.max_new_tokens=8",
    )
    lines = [json.loads(line) for line in (work / "gen" / "generations_step0.jsonl").read_text().splitlines()]
    records = head(work / "data" / "validation.jsonl", 3)
    assert [(s["prompt"], s["expected"]) for s in lines] == [(r["input"], r["output"]) for r in records]
    tok = AutoTokenizer.from_pretrained(str(work / "tokenizer"))
    hf = LlamaForCausalLM.from_pretrained(str(work / "hf_weights")).eval()
    for sample, r in zip(lines, records):
        prompt = [tok.bos_token_id] + tok.encode(r["input"], add_special_tokens=False)
        with torch.no_grad():
            out = hf.generate(
                torch.tensor([prompt]),
                max_new_tokens=8,
                do_sample=False,
                eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id,
            )[0, len(prompt) :].tolist()
        new = out[: out.index(tok.eos_token_id)] if tok.eos_token_id in out else out
        assert sample["answer"] == tok.decode(new, skip_special_tokens=True).strip()
    hits = sum(s["answer"] == s["expected"].strip() for s in lines)
    assert metrics[0]["gen_samples"] == 3 and metrics[0]["gen_exact_match"] == hits / 3
