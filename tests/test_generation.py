"""Greedy generation with the KV cache gives what transformers' greedy generate gives, one prompt at a time."""

import torch
from conftest import tiny_llama


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
