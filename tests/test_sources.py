"""Training sources: (images, targets, extras) with each image's (epoch, index) key; replay; no shared mutation."""
from __future__ import annotations

import torch

from distill_support import small_data
from vitshrink.data.sources import labelled_source, train_transform
from vitshrink.io import create_model
from vitshrink.recipes import load_preset


def test_batches_carry_keys_replay_and_leave_the_split_alone():
    data = small_data(96, 8)
    split = data.train
    assert split.transform is None
    student = create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=48, depth=1, num_heads=3,
                           num_classes=10)
    cfg = {**load_preset("vanilla"), "batch_size": 16, "workers": 0}
    source = labelled_source(split, student, cfg, seed=3)
    assert split.transform is None  # the source reads a view with its own transform
    assert source.batches_per_epoch() == 96 // 16
    source.set_epoch(2)
    batches = [batch for _, batch in zip(range(3), source)]
    images, targets, extras = batches[0]
    assert images.shape == (16, 3, 32, 32) and extras["key"].shape == (16, 2) and extras["key"].dtype == torch.long
    assert (extras["key"][:, 0] == 2).all()  # epoch column
    indices = extras["key"][:, 1].tolist()
    assert targets.tolist() == [split.targets[i] for i in indices]
    # A key replays its image exactly (augmentation seeded by (seed, epoch, index)).
    replay = source.dataset[(2, indices[5])]
    assert torch.equal(replay[0], images[5]) and replay[2] == (2, indices[5])
    # Resuming after one batch yields the second batch first; another epoch gives another order.
    source.set_epoch(2, skip_batches=1)
    resumed = next(iter(source))
    assert torch.equal(resumed[0], batches[1][0]) and torch.equal(resumed[2]["key"], batches[1][2]["key"])
    source.set_epoch(3)
    assert next(iter(source))[2]["key"][:, 1].tolist() != indices
    assert split.transform is None and train_transform(student, cfg) is not None
