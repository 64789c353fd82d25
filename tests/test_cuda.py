"""The CUDA path of 05 gives the CPU's numbers. Runs only where torch sees a CUDA device."""

import pytest
import torch
from conftest import tiny_llama, train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_logits_on_cuda_match_transformers_on_cpu(train_mod, tokenizer_dir, tmp_path):
    model, hf = tiny_llama(train_mod, tmp_path, tokenizer_dir)
    ids = torch.randint(0, 300, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf(ids).logits
        m = model.cuda()
        pos = torch.arange(64).expand(2, 64).cuda()
        got = m.logits(m(ids.cuda(), pos, train_mod.document_mask(torch.ones_like(ids).cuda()))).cpu()
    assert (got - expected).abs().max().item() < 1e-4


def test_training_on_cuda_reproduces_the_cpu_losses(pipeline):
    work, overlay = pipeline
    common = [
        "trainer.max_steps=3",
        "model_alignment_strategy.peft.lora_dropout=0",
        "evaluation.generate.num_prompts=2",
    ]
    cpu = train(work, overlay, "cpu", *common, "trainer.accelerator=cpu")
    gpu = train(work, overlay, "cuda", *common, "trainer.accelerator=cuda")
    assert [m.get("loss", m.get("val_loss")) for m in gpu] == pytest.approx(
        [m.get("loss", m.get("val_loss")) for m in cpu], abs=1e-4
    )


def test_autocast_on_cuda_trains_and_stays_close_to_fp32(pipeline):
    work, overlay = pipeline
    fp32 = train(
        work,
        overlay,
        "cuda-fp32",
        "trainer.accelerator=cuda",
        "trainer.max_steps=0",
        "evaluation.generate.num_prompts=0",
    )
    bf16 = train(
        work, overlay, "cuda-bf16", "trainer.accelerator=cuda", "precision.type=autocast", "trainer.max_steps=4"
    )
    assert bf16[0]["val_loss"] == pytest.approx(fp32[0]["val_loss"], rel=0.05)
    assert bf16[-1]["val_loss"] < bf16[0]["val_loss"]


def test_pinned_batches_reach_the_gpu_unchanged_one_ahead_of_their_use(train_mod):
    """From pinned memory, each copy issued while the batch before it is used (the events of the held host batches
    are recorded on the GPU's stream)."""
    sent = []

    def batches():
        for i in range(6):
            sent.append(i)
            yield {"x": torch.full((1 << 20,), float(i))}

    for i, batch in enumerate(train_mod.prefetched(batches(), torch.device("cuda", 0), pin=True)):
        assert batch["x"].is_cuda and int(batch["x"][0]) == i and len(sent) == min(i + 2, 6)
