"""The episode protocol (ilstudio/data/source.py) is the only switch between formats.

A third format (tests/npz_episodes.py: one module, one ``register_format``) is read, checked,
normalized, batched, converted and trained on with no edit to ilstudio; and no reader in the
package asks which format it holds (``hasattr(..., "open_source")``) or reads HDF5 keys
outside the HDF5 module.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys

import h5py
import npz_episodes
import numpy as np
import pytest
import torch
from conftest import REPO, tiny_args, train_env

from ilstudio.data import source


@pytest.fixture
def npz_dir(tiny_data, tmp_path):
    saved = source.registered_formats()
    npz_episodes.register()
    d = tmp_path / "npz"
    npz_episodes.write_from_hdf5(tiny_data, d)
    yield d
    source._FORMATS[:] = saved


def test_no_format_switches_and_no_hdf5_keys_outside_the_hdf5_module():
    hdf5_module = REPO / "ilstudio/data/episodes.py"
    for f in sorted((REPO / "ilstudio").rglob("*.py")):
        tree = ast.parse(f.read_text(), str(f))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("hasattr", "getattr") \
                    and len(node.args) > 1 and isinstance(node.args[1], ast.Constant):
                assert node.args[1].value != "open_source", f"{f}:{node.lineno}"
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and f != hdf5_module:
                assert not node.value.startswith("observations/"), f"{f}:{node.lineno}: {node.value}"
        assert "open_source" not in f.read_text(), f


def test_a_registered_third_format_reads_through_every_reader(npz_dir, tiny_data, tmp_path):
    from ilstudio.config.settings import DatasetSettings, TaskSettings
    from ilstudio.data.batched import batched
    from ilstudio.data.checked import check_dataset
    from ilstudio.data.convert import convert
    from ilstudio.data.dataset import build_datasets
    from ilstudio.data.language import read_episode_text
    from ilstudio.data.sources import list_episodes

    refs = list_episodes(str(npz_dir))
    assert [type(r).__name__ for r in refs] == ["NpzEpisode"] * 4
    assert read_episode_text(refs[0], 50).instruction == "pick the cube"
    task = TaskSettings(dataset_dir=str(npz_dir), camera_names=("top",), episode_len=50)
    hdf5_task = TaskSettings(dataset_dir=str(tiny_data), camera_names=("top",), episode_len=50)
    settings = DatasetSettings(preload_data=True, image_size=(12, 16), lazy_preprocess=False)
    ours, theirs = (build_datasets(check_dataset(t, settings), t, settings, 5, True, 0) for t in (task, hdf5_task))
    assert ours[3]["timesteps_train"] == theirs[3]["timesteps_train"] == 150
    assert np.array_equal(ours[2].qpos_mean, theirs[2].qpos_mean)
    fast = batched(ours[0])
    assert fast is not ours[0]  # preloaded, fitted up front: gathered whole batches
    batch = fast.__getitems__([0, 7, 120])
    for k, i in enumerate((0, 7, 120)):
        a, b = ours[0][i], theirs[0][i]
        for key in a:
            assert torch.equal(a[key], b[key]) and torch.equal(batch[key][k], a[key]), key
    convert(str(npz_dir), tmp_path / "h5", "hdf5")
    with h5py.File(tmp_path / "h5/episode_2.hdf5") as f, np.load(npz_dir / "ep002.npz") as z:
        assert np.array_equal(f["observations/images/top"][()], z["image_top"])
        assert f.attrs["language_instruction"] == "pick the cube"


TRAIN_ON_NPZ = """
import sys
import npz_episodes
npz_episodes.register()
from ilstudio.main import run_cli
run_cli()  # absl reads sys.argv: ['-c', flags...]
"""


def test_train_py_trains_on_the_third_format(npz_dir, tmp_path):
    out = tmp_path / "run"
    env = train_env(PYTHONPATH=f"{REPO / 'tests'}:{REPO}")
    r = subprocess.run([sys.executable, "-c", TRAIN_ON_NPZ, *tiny_args(npz_dir, out, "--max_steps=3",
                                                                        "--save_strategy=no")],
                       cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(next(out.rglob("data_summary.json")).read_text())
    assert summary["episodes_found"] == 4 and summary["timesteps_train"] == 200, summary
