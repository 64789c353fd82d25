"""The step on an accelerator: no host read, no Python scalar in a graph, and its generators seeded explicitly.
(DeviceAdamW is device-agnostic code, so its arithmetic is checked here on CPU tensors; the XLA tier runs it on
XLA's device.)"""

import copy

import pytest
import torch
from conftest import load_stage


@pytest.fixture(scope="module")
def train():
    return load_stage("05_train.py")


def adamw_pair(train, seed=0):
    torch.manual_seed(seed)
    theirs = [torch.randn(8, 4, requires_grad=True), torch.randn(4, requires_grad=True)]
    ours = [p.detach().clone().requires_grad_() for p in theirs]
    kw = dict(lr=3e-2, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01)
    return ours, train.DeviceAdamW(ours, **kw), theirs, torch.optim.AdamW(theirs, **kw)


def grads_for(params, step):
    g = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)


def test_device_adamw_is_torchs_adamw(train):
    ours, opt, theirs, ref = adamw_pair(train)
    for step in range(6):
        lr = 3e-2 * (1 - step / 6)  # a schedule, down to lr 0 at the end
        grads_for(ours, step)
        grads_for(theirs, step)
        for group in ref.param_groups:
            group["lr"] = lr
        ref.step()
        opt.step(torch.tensor(lr), skip=torch.tensor(False))
    for a, b in zip(ours, theirs):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


def test_a_skipped_step_leaves_weights_moments_and_count_as_they_were(train):
    ours, opt, _, _ = adamw_pair(train)
    grads_for(ours, 0)
    opt.step(torch.tensor(1e-2), skip=torch.tensor(False))
    before = ([p.detach().clone() for p in ours], copy.deepcopy(opt.state_dict()))
    for p in ours:
        p.grad = torch.full(p.shape, float("nan"))
    opt.step(torch.tensor(1e-2), skip=torch.tensor(True))
    assert all(torch.equal(a, b) for a, b in zip(ours, before[0]))
    after = opt.state_dict()["state"]
    for i, state in before[1]["state"].items():
        assert all(torch.equal(state[k], after[i][k]) for k in ("step", "exp_avg", "exp_avg_sq"))


def test_device_adamw_state_resumes_on_the_parameters_device(train):
    ours, opt, _, _ = adamw_pair(train)
    grads_for(ours, 0)
    opt.step(torch.tensor(1e-2), skip=torch.tensor(False))
    fresh = train.DeviceAdamW(ours, lr=1e-2)
    fresh.load_state_dict(opt.state_dict())
    assert all(s["step"].device == ours[0].device and s["step"].dim() == 0 for s in fresh.state.values())


def layout(train, tp):
    return train.Layout(train.Arch(vocab=tp, hidden=tp, inter=tp, layers=1, heads=tp, kv_heads=tp, head_dim=1), tp=tp)


def masks_drawn(train, tp, world, device_type="cpu"):
    """The dropout mask each rank draws first, after seeding as 05 does (seed, then seed_dropout)."""
    out = []
    for rank in range(world):
        par = train.Parallel(layout(train, tp), torch.device("cpu"), world=world, rank=rank, connect=False)
        torch.manual_seed(1234)
        torch.rand(5)  # LoRA's initialisation draws alike on every rank before the masks
        train.seed_dropout(1234, par, torch.device(device_type))
        out.append(torch.rand(16) >= 0.5)
    return out


def test_tensor_parallel_ranks_draw_the_same_masks_and_data_parallel_replicas_others(train):
    m = masks_drawn(train, tp=2, world=4)  # ranks 0, 1: replica 0; ranks 2, 3: replica 1
    assert torch.equal(m[0], m[1]) and torch.equal(m[2], m[3])
    assert not torch.equal(m[0], m[2])


def test_every_rank_seeds_its_device_generator_explicitly(train, monkeypatch):
    """Not through an import side effect: the device module's manual_seed, with seed + dp_rank, on every rank."""
    seeded = []
    monkeypatch.setattr(torch.cuda, "manual_seed", lambda s: seeded.append(s))
    masks_drawn(train, tp=2, world=4, device_type="cuda")
    assert seeded == [1234, 1234, 1235, 1235]


def test_the_next_batch_is_copied_before_the_current_one_is_used(train):
    drawn = []

    def batches():
        for i in range(3):
            drawn.append(i)
            yield {"x": torch.tensor([i])}

    got = []
    for batch in train.prefetched(batches(), torch.device("cpu"), pin=False):
        got.append((int(batch["x"]), list(drawn)))
    assert got == [(0, [0, 1]), (1, [0, 1, 2]), (2, [0, 1, 2])]


def watched_batches(n, refs):
    """n batches of fresh host tensors; `refs` receives a weak reference to each, telling whether it still exists."""
    import weakref

    for i in range(n):
        batch = {"x": torch.full((4,), float(i))}
        refs.append(weakref.ref(batch["x"]))
        yield batch


def test_with_pinning_asked_for_on_the_cpu_the_batches_arrive_unchanged_and_in_order(train):
    """There is nothing to pin memory for on the CPU (no accelerator): the same batches, one ahead."""
    got = [int(b["x"][0]) for b in train.prefetched(watched_batches(6, []), torch.device("cpu"), pin=True)]
    assert got == list(range(6))


def test_a_host_batch_outlives_its_copy_on_a_device_without_events(train):
    """A non_blocking copy reads its host batch after the call returns: where the device has no events to say when
    it is done (the meta device here), each host batch is held until HELD_BATCHES later ones have been issued."""
    refs = []
    for batch in train.prefetched(watched_batches(6, refs), torch.device("meta"), pin=False):
        assert batch["x"].device.type == "meta"
        issued = len(refs)
        assert [r() is not None for r in refs] == [k >= issued - train.HELD_BATCHES for k in range(issued)]


def test_a_host_batch_is_let_go_once_the_event_after_its_copy_has_passed(train, monkeypatch):
    """Where the device has events (CUDA, TorchNeuron) an event is recorded after each copy and its host batch held
    until it has passed; here every event has passed when it is first looked at."""

    class Passed:  # stands in for torch.Event on the meta device, which has none
        def query(self):
            return True

        def synchronize(self):
            pass

    monkeypatch.setattr(train, "copy_event", lambda device: Passed())
    refs = []
    for _ in train.prefetched(watched_batches(6, refs), torch.device("meta"), pin=False):
        alive = [r() is not None for r in refs]
        assert alive == [False] * (len(refs) - 1) + [True]  # the newest is the loader's current batch
