"""Loading a Hugging Face checkpoint without memory-mapping it (quantized or cast loads).

transformers 5 reads safetensors through one memory map of each file and quantizes (or
casts) tensor by tensor. Every page it reads stays mapped, so it counts in the process's
resident memory until the load ends, and tensors kept as they are (an unquantized embedding
or vision tower) remain views of the map afterwards: a 4-bit load of a 2 GB fp32 checkpoint
ends with ~1.4 GB of the file resident, more than the quantized model itself.

``from_pretrained_unmapped`` hands ``from_pretrained`` a state dict of lazy tensors instead
(``LazyTensor``: the safetensors header gives each tensor's offset): each is read with
``pread`` straight into fresh memory only when transformers converts it, and the
full-precision copy is freed once it is quantized or cast. (safetensors' own pread backend,
``safe_open(..., backend="pread")``, reads a tensor through a second buffer: twice its size
at once, 1 GiB for a 0.5 B model's fp32 embedding.) The loaded weights are the same
(tests/test_unmapped_load.py). It applies to local directories with safetensors weights;
anything else (a hub id in a cache, .bin weights, an unusual dtype) loads the normal way.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def safetensors_files(directory: str | Path) -> list[Path]:
    """The weight files of a local checkpoint directory (sharded or not); [] when none."""
    d = Path(directory)
    if (d / INDEX).is_file():
        names = sorted(set(json.loads((d / INDEX).read_text())["weight_map"].values()))
        return [d / n for n in names]
    return [d / SINGLE] if (d / SINGLE).is_file() else []


# safetensors dtype names -> torch dtypes (little-endian on disk, as on every CPU torch runs on here)
_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
           "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


class LazyTensor:
    """One tensor of a safetensors file, read into fresh memory when indexed with ``[...]``
    (what transformers does when it converts it). Reads straight into the new tensor's
    storage with ``os.preadv``: no second buffer, no memory map."""

    def __init__(self, path: Path, offset: int, nbytes: int, shape: list[int], dtype: Any) -> None:
        self.path, self.offset, self.nbytes = path, offset, nbytes
        self.shape, self.dtype = tuple(shape), dtype

    def is_floating_point(self) -> bool:
        return self.dtype.is_floating_point

    def get_shape(self) -> list[int]:
        return list(self.shape)

    def read(self) -> Any:
        import torch

        out = torch.empty(self.shape, dtype=self.dtype)
        view = memoryview(out.reshape(-1).view(torch.uint8).numpy())
        done = 0
        with open(self.path, "rb", buffering=0) as f:
            while done < self.nbytes:  # one read returns at most ~2 GiB
                n = os.preadv(f.fileno(), [view[done:]], self.offset + done)
                if n <= 0:
                    raise OSError(f"{self.path}: truncated tensor data")
                done += n
        return out

    def __getitem__(self, index: Any) -> Any:
        return self.read() if index is Ellipsis else self.read()[index]


def lazy_state_dict(files: list[Path]) -> dict[str, LazyTensor] | None:
    """Every tensor of ``files`` as a LazyTensor; None when a dtype is not one read here."""
    import torch

    state: dict[str, LazyTensor] = {}
    for f in files:
        with open(f, "rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(size))
        for key, info in header.items():
            if key == "__metadata__":
                continue
            if info["dtype"] not in _DTYPES:
                return None
            begin, stop = info["data_offsets"]
            state[key] = LazyTensor(f, 8 + size + begin, stop - begin, info["shape"],
                                    getattr(torch, _DTYPES[info["dtype"]]))
    return state


def from_pretrained_unmapped(auto_class: Any, name: str, config: Any, *, subfolder: str = "",
                             **kwargs: Any) -> Any:
    """``auto_class.from_pretrained(name, config=config, subfolder=subfolder, **kwargs)``,
    reading a local directory's safetensors with pread instead of a memory map.

    ``kwargs``: what ``from_pretrained`` takes (quantization_config, dtype, attn_implementation,
    cache_dir, ...). The generation config is read from the directory as ``from_pretrained``
    would. ``config`` itself is left as it was.
    """
    import copy

    from transformers import GenerationConfig
    from transformers.models.auto.auto_factory import _get_model_class

    config = copy.deepcopy(config)  # from_pretrained records its quantization_config on it
    directory = Path(name) / subfolder
    files = safetensors_files(directory) if directory.is_dir() else []
    state = lazy_state_dict(files) if files else None
    if state is None:
        sub = {"subfolder": subfolder} if subfolder else {}
        return auto_class.from_pretrained(name, config=config, **sub, **kwargs)
    kwargs.pop("cache_dir", None)  # a local directory: nothing to cache
    model_class = _get_model_class(config, auto_class._model_mapping)
    model = model_class.from_pretrained(None, config=config, state_dict=state, **kwargs)
    if model.can_generate() and (directory / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(directory)
    return model
