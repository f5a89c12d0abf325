"""A skipped optimizer step leaves every balancer's state as it was, for a whole accumulation window.

``nonfinite_loss="skip"`` with ``accumulate_grad_batches=2``: a window whose first or second
micro-batch is non-finite is skipped; the finite micro-batch of that window must not advance the
balancer either (FAMO's logits and private Adam, RLW's generator, GradNorm's weights, GradVac's
targets, DWA's history, DB-MTL's moving average, ...). The run then equals, exactly, the run on the
same data without that window.
"""

import copy

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from conftest import quiet_trainer
from lightning_mtl.balancers import BALANCERS, NashMTL
from test_balancers_training import AVAILABLE, _same_state
from test_module import SharedInput, make_module, make_tasks

MICRO, WINDOWS, BAD_WINDOW = 16, 4, 1


class Windows(Dataset):
    """Four windows of two 16-sample micro-batches; window 1's micro-batch ``bad`` has an infinite target, or
    (``drop``) window 1 is left out."""

    def __init__(self, bad=None, drop=False):
        base = SharedInput(MICRO * 2 * WINDOWS)
        self.items = []
        for i in range(len(base)):
            window, micro = divmod(i // MICRO, 2)
            if drop and window == BAD_WINDOW:
                continue
            x, y = base[i]
            if window == BAD_WINDOW and micro == bad and i % MICRO == 0:
                y = {"cls": y["cls"], "reg": torch.tensor(float("inf"))}
            self.items.append((x, y))

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def fit(name, mode, data, steps):
    module = make_module(tasks=make_tasks(metrics=False), balancer=balancer(name), gradients=mode, nonfinite_loss="skip",
                         optimizer=lambda p: torch.optim.SGD(p, lr=0.1))  # fmt: skip
    trainer = quiet_trainer(max_steps=steps, accumulate_grad_batches=2)
    trainer.fit(module, DataLoader(data, batch_size=MICRO))
    return module


CASES = [(name, "parameters") for name in AVAILABLE if name != "static"] + [
    (name, "representation") for name in ("gradnorm", "gradvac", "nashmtl", "mgda") if name in AVAILABLE
] + ([("nashmtl-every-3", "parameters")] if "nashmtl" in AVAILABLE else [])  # its solver's re-solve count


def balancer(name):
    return NashMTL(update_weights_every=3) if name == "nashmtl-every-3" else name


@pytest.mark.parametrize("bad", [0, 1], ids=["first-micro-batch", "second-micro-batch"])
@pytest.mark.parametrize("name, mode", CASES)
def test_a_skipped_window_changes_nothing(name, mode, bad):
    if mode == "representation" and not BALANCERS[name].supports_representation:  # (none of CASES today)
        pytest.skip(f"{name} refuses representation mode")
    with pytest.warns(UserWarning, match="skipped"):
        skipped = fit(name, mode, Windows(bad=bad), WINDOWS)  # the skipped window counts as an optimizer step
    clean = fit(name, mode, Windows(drop=True), WINDOWS - 1)
    for (key, p), q in zip(skipped.named_parameters(), clean.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=f"{name}: parameter {key}")
    assert _same_state(copy.deepcopy(skipped.balancer.state_dict()), clean.balancer.state_dict()), name
    initial = make_module(tasks=make_tasks(metrics=False), balancer=balancer(name), gradients=mode)
    assert any(not torch.equal(p, q) for p, q in zip(clean.parameters(), initial.parameters()))  # it trained


class Unlabelled(Dataset):
    """SharedInput whose batches (of 8) 1, 2 and 3 have no labelled sample of either task."""

    def __init__(self):
        self.base = SharedInput(48, missing_cls=range(8, 32), missing_reg=range(8, 32))

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        return self.base[i]


def test_steps_without_labels_are_warned_about_once_per_epoch_then_counted():
    module = make_module(tasks=make_tasks(metrics=False))  # 6 batches an epoch; Lightning counts skipped steps too
    with pytest.warns(UserWarning) as caught:
        quiet_trainer(max_epochs=2).fit(module, DataLoader(Unlabelled(), batch_size=8))
    messages = [str(w.message) for w in caught if "labelled sample" in str(w.message)]
    assert messages == [
        "step 1: no task had a labelled sample in this process's batch; the step is skipped. Further such steps of "
        "this epoch are counted and reported at the epoch's end.",
        "epoch 0: 3 training steps had no labelled sample in this process's batch",
        "step 7: no task had a labelled sample in this process's batch; the step is skipped. Further such steps of "
        "this epoch are counted and reported at the epoch's end.",
        "epoch 1: 3 training steps had no labelled sample in this process's batch",
    ]
