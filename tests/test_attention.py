"""Attention over packed rows: the three modes (blocks, masked, causal) give the same numbers, and the
settings that would not are refused."""

import pytest
import torch
from conftest import train

NO_GEN = ["evaluation.generate.num_prompts=0"]


def losses(records, key="loss"):
    return [r[key] for r in records if key in r]


@pytest.mark.parametrize("packing, modes", [(True, ("blocks", "masked")), (False, ("blocks", "masked", "causal"))])
def test_every_attention_choice_gives_the_same_losses(pipeline, packing, modes):
    work, overlay = pipeline
    runs = {
        m: train(
            work,
            overlay,
            f"attn-{m}-{packing}",
            "model.attention=" + m,
            "trainer.max_steps=2",
            f"model_alignment_strategy.sft.packing={str(packing).lower()}",
            *NO_GEN,
        )
        for m in modes
    }
    for mode in modes[1:]:
        assert losses(runs[mode]) == pytest.approx(losses(runs[modes[0]]), abs=1e-5), mode
        assert losses(runs[mode], "val_loss") == pytest.approx(losses(runs[modes[0]], "val_loss"), abs=1e-5), mode


def test_causal_attention_with_packing_is_refused(pipeline):
    work, overlay = pipeline
    with pytest.raises(Exception, match="packed documents attend to each other"):
        train(work, overlay, "causal-packed", "model.attention=causal")


def test_block_attention_cannot_be_compiled(pipeline):
    work, overlay = pipeline
    with pytest.raises(Exception, match="model.attention=blocks changes shapes"):
        train(work, overlay, "blocks-compiled", "model.attention=blocks", "trainer.compile=true")


def test_attention_over_each_blocks_reachable_keys_equals_full_attention(train_mod):
    cfg = dict(
        vocab=64,
        hidden=32,
        inter=48,
        layers=2,
        heads=4,
        kv_heads=2,
        head_dim=8,
        eps=1e-5,
        rope_theta=10000.0,
        rope_scaling=None,
        tie=False,
    )
    torch.manual_seed(0)
    model = train_mod.Llama(train_mod.Arch(**cfg))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    seg = torch.tensor([[1] * 5 + [2] * 20 + [3] * 3 + [0] * 12, [1] * 20 + [2] * 20])
    pos = torch.cat([torch.arange(n) for n in (5, 20, 3, 12, 20, 20)]).view(2, 40)
    ids = torch.randint(0, 64, (2, 40))
    spans = train_mod.attention_spans(seg, 8)
    # Queries 24..31 start in documents beginning at 5 (row 0) and 20 (row 1); queries 32..39 in the padding
    # run from 28 (row 0) and the document from 20 (row 1).
    assert spans == [(0, 8, 0), (8, 16, 0), (16, 24, 0), (24, 32, 5), (32, 40, 20)]
    with torch.no_grad():
        full = model(ids, pos, train_mod.document_mask(seg))
        blocked = model(ids, pos, train_mod.document_mask(seg), spans=spans)
    assert torch.allclose(full, blocked, atol=1e-6)
