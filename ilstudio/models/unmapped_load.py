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
at once, 1 GiB for a 0.5 B model's fp32 embedding.) When transformers would cast every
tensor to the load's dtype first (``_cast_on_read``), each is converted while it is read, 16 MiB
of the file at a time, so a wide fp32 tensor never exists whole. The loaded weights are the same
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
CAST_BLOCK = 16 * 2**20  # bytes of the file read at once when converting while reading
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
        self.cast_to: Any = None  # read as this narrower dtype (set by from_pretrained_unmapped)

    def is_floating_point(self) -> bool:
        return self.dtype.is_floating_point

    def get_shape(self) -> list[int]:
        return list(self.shape)

    def read(self) -> Any:
        """The whole tensor; as ``cast_to`` when set, converted a block at a time, so the
        file's wider copy never exists whole (a 0.5 B model's fp32 embedding is 519 MiB)."""
        import torch

        if self.cast_to is None:
            return self._pread_into(torch.empty(self.shape, dtype=self.dtype), self.offset)
        out = torch.empty(self.shape, dtype=self.cast_to)
        flat, step = out.reshape(-1), CAST_BLOCK // self.dtype.itemsize
        block = torch.empty(min(step, flat.numel()), dtype=self.dtype)
        for start in range(0, flat.numel(), step):
            part = block[:min(step, flat.numel() - start)]
            flat[start:start + part.numel()].copy_(
                self._pread_into(part, self.offset + start * self.dtype.itemsize))
        return out

    def rows(self, start: int, count: int) -> Any:
        """Rows ``start:start + count`` of a tensor of 1+ dimensions, read alone."""
        import torch

        row = self.nbytes // self.shape[0]
        return self._pread_into(torch.empty((count, *self.shape[1:]), dtype=self.dtype),
                                self.offset + start * row)

    def mapped(self) -> Any:
        """The tensor as a copy-on-write memory map of its bytes in the file: nothing is read
        until used, pages read stay file-backed, a write copies only the page it touches."""
        import mmap

        import torch

        with open(self.path, "rb") as f:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        count = self.nbytes // self.dtype.itemsize
        return torch.frombuffer(mm, dtype=self.dtype, count=count, offset=self.offset).view(self.shape)

    def _pread_into(self, out: Any, offset: int) -> Any:
        import torch

        view = memoryview(out.reshape(-1).view(torch.uint8).numpy())
        done, nbytes = 0, view.nbytes
        with open(self.path, "rb", buffering=0) as f:
            while done < nbytes:  # one read returns at most ~2 GiB
                n = os.preadv(f.fileno(), [view[done:]], offset + done)
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


def _cast_on_read(model_class: Any, config: Any, dtype: Any) -> Any:
    """``dtype`` when transformers would cast every floating checkpoint tensor to it before
    anything else (it does, ``core_model_loading._materialize_copy``, quantized weights
    included), so converting while reading gives the same weights; else None: a pre-quantized
    checkpoint, or a model that keeps some modules in fp32 (``_keep_in_fp32_modules*``)."""
    import torch

    if not isinstance(dtype, torch.dtype) or getattr(config, "quantization_config", None):
        return None
    with torch.device("meta"):
        skeleton = model_class._from_config(config)
    strict = getattr(skeleton, "_keep_in_fp32_modules_strict", None)
    loose = getattr(skeleton, "_keep_in_fp32_modules", None) if dtype == torch.float16 else None
    return None if strict or loose else dtype


def from_pretrained_unmapped(auto_class: Any, name: str, config: Any, *, subfolder: str = "",
                             map_embeddings: bool = False, **kwargs: Any) -> Any:
    """``auto_class.from_pretrained(name, config=config, subfolder=subfolder, **kwargs)``,
    reading a local directory's safetensors with pread instead of a memory map.

    ``kwargs``: what ``from_pretrained`` takes (quantization_config, dtype, attn_implementation,
    cache_dir, ...). The generation config is read from the directory as ``from_pretrained``
    would. ``config`` itself is left as it was. ``map_embeddings``: afterwards, leave the
    token embedding and lm head in the file (``mapped_embeddings.map_embeddings``).
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
    narrow = _cast_on_read(model_class, config, kwargs.get("dtype"))
    for lazy in state.values():
        if narrow is not None and lazy.dtype.is_floating_point and lazy.dtype.itemsize > narrow.itemsize:
            lazy.cast_to = narrow
    model = model_class.from_pretrained(None, config=config, state_dict=state, **kwargs)
    if model.can_generate() and (directory / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(directory)
    if map_embeddings:
        from ilstudio.models.mapped_embeddings import map_embeddings as map_them

        mapped = map_them(model, state)
        if mapped:
            from absl import logging

            logging.info("left in the checkpoint file (memory-mapped, read as used): %s", ", ".join(mapped))
    return model
