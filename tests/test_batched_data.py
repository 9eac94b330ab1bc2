"""Batched fetching (ilstudio/data/batched.py) gives exactly the per-sample batches."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from transformers import default_data_collator

from ilstudio.config.settings import DatasetSettings, TaskSettings
from ilstudio.data.batched import Batch, BatchedEpisodes, batched, collate
from ilstudio.data.dataset import EpisodeDataset
from ilstudio.data.episodes import list_episode_files
from ilstudio.data.normalization import compute_stats


def _dataset(data, chunk: int, **kw) -> EpisodeDataset:
    paths = list_episode_files(str(data))
    task = TaskSettings(dataset_dir=str(data), state_dim=14, action_dim=14, camera_names=["top"],
                        episode_len=50)
    return EpisodeDataset(paths, task, DatasetSettings(**kw), chunk, compute_stats(paths))


@pytest.mark.parametrize("chunk,history,images,extra", [
    (20, 1, True, {}), (7, 3, True, {}), (1, 1, False, {}),
    (5, 2, True, {"lazy_preprocess": False, "image_size": (12, 16)})])
def test_batches_equal_per_sample_batches(tiny_data, chunk, history, images, extra):
    ds = _dataset(tiny_data, chunk, preload_data=True, history_images_length=history,
                  is_multimodal=images, **extra)
    view = batched(ds)
    assert isinstance(view, BatchedEpisodes)
    rng = np.random.RandomState(0)
    # episode starts and ends (padding, history before frame 0) plus random samples
    edges = [0, 1, 2, 49, 48, 35, 50, 51, 99, 100, 149, 199, 198]
    for idx in (edges, rng.randint(0, len(ds), 64).tolist()):
        got = collate(view.__getitems__(idx))
        want = default_data_collator([ds[i] for i in idx])
        assert got.keys() == want.keys()
        for k in want:
            assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k


def test_only_preloaded_datasets_are_batched(tiny_data):
    lazy = _dataset(tiny_data, 5)
    assert batched(lazy) is lazy
    fitted_per_sample = _dataset(tiny_data, 5, preload_data=True, image_size=(12, 16))
    assert batched(fitted_per_sample) is fitted_per_sample
    view = batched(_dataset(tiny_data, 5, preload_data=True))
    assert len(view) == 200 and view.episode_lengths.tolist() == [50] * 4  # attributes pass through
    assert torch.equal(view[3]["qpos"], view.ds[3]["qpos"])
    with pytest.raises(IndexError):
        view.__getitems__([0, 200])
    clone = pickle.loads(pickle.dumps(view))  # DataLoader workers (spawn) pickle it
    assert torch.equal(collate(clone.__getitems__([5]))["action"], collate(view.__getitems__([5]))["action"])
    assert collate([view[0], view[1]])["qpos"].shape == (2, 14)  # plain lists still collate
    assert isinstance(view.__getitems__([0]), Batch)


def test_dataloader_uses_the_batched_path(tiny_data):
    view = batched(_dataset(tiny_data, 5, preload_data=True))
    calls = []
    real = view.__getitems__
    view.__getitems__ = lambda idx: calls.append(len(idx)) or real(idx)
    loader = torch.utils.data.DataLoader(view, batch_size=16, collate_fn=collate)
    batch = next(iter(loader))
    assert calls == [16] and batch["images"].shape == (16, 1, 3, 24, 32)
