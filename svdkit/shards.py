"""Read and write safetensors checkpoints a few tensors at a time, so that no step holds a whole model.

`TensorIndex` maps tensor names to the files of a folder (one `*.safetensors` file, or shards listed by a
`*.safetensors.index.json`) and reads any subset, opening and closing each file per read so that
memory-mapped pages do not pile up. `ShardWriter` streams tensors to disk as they come, one shard per `add` (or
per `max_shard_bytes`), and names the shards and writes the index at the end, as transformers does.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Iterable
from pathlib import Path

import torch

from .errors import SvdkitError


class ShardError(SvdkitError, ValueError):
    """Raised for a folder whose safetensors files or index are missing, unreadable or inconsistent."""


def unique_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop aliases of tied tensors (safetensors stores each storage once): the first name of each storage."""
    seen: set[tuple] = set()
    out = {}
    for k, v in state.items():
        key = (v.device, v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), v.dtype)
        if key in seen:
            continue
        seen.add(key)
        out[k] = v
    return out


class TensorIndex:
    """The tensors of a safetensors checkpoint folder: name -> file, shape and dtype, read on demand."""

    def __init__(self, folder: str | os.PathLike, stem: str = "model") -> None:
        from safetensors import safe_open

        self.folder = Path(folder)
        self.checkpoint: Path  # what a loader is pointed at: the index of a sharded checkpoint, or its one file
        single, index = self.folder / f"{stem}.safetensors", self.folder / f"{stem}.safetensors.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise ShardError(f"{index}: not a readable safetensors index ({type(e).__name__}: {e})") from e
            files = sorted(set(weight_map.values()))
            self.checkpoint = index
        elif single.exists():
            self.checkpoint = single
            files, weight_map = [single.name], None
        else:
            raise ShardError(f"{self.folder} has neither {single.name} nor {index.name}")
        self.files: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, torch.dtype] = {}
        for name in files:
            path = self.folder / name
            try:
                with safe_open(str(path), framework="pt") as f:
                    for key in f.keys():  # noqa: SIM118 - a safe_open object is not iterable
                        sl = f.get_slice(key)
                        self.files[key] = path
                        self.shapes[key] = tuple(sl.get_shape())
                        self.dtypes[key] = _DTYPES.get(sl.get_dtype(), torch.float32)
            except FileNotFoundError as e:
                raise ShardError(f"{path} is listed by the index but missing") from e
            except Exception as e:  # safetensors raises its own error type for truncated or corrupt headers
                raise ShardError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from e
        if weight_map is not None and set(weight_map) != set(self.files):
            missing = sorted(set(weight_map) - set(self.files))[:3]
            extra = sorted(set(self.files) - set(weight_map))[:3]
            raise ShardError(f"{index} does not match its shards: listed but absent {missing}, present but "
                             f"unlisted {extra}")

    def names(self) -> list[str]:
        return list(self.files)

    def read(self, names: Iterable[str], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """Tensors `names`, each file opened once and closed again (no mapping outlives the call)."""
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for n in names:
            if n not in self.files:
                raise ShardError(f"{self.folder}: no tensor named {n!r}")
            by_file.setdefault(self.files[n], []).append(n)
        out = {}
        for path, keys in by_file.items():
            try:
                with safe_open(str(path), framework="pt", device=str(device)) as f:
                    for k in keys:
                        out[k] = f.get_tensor(k)
            except Exception as e:
                raise ShardError(f"{path}: cannot read {keys[0]!r} ({type(e).__name__}: {e})") from e
        return out

    def with_prefix(self, prefix: str) -> list[str]:
        """Names that start with `prefix` (e.g. one decoder block's tensors)."""
        return [n for n in self.files if n.startswith(prefix)]

    def floating_dtype(self) -> torch.dtype | None:
        """The dtype of the checkpoint's floating-point tensors (the most common one), None if it has none."""
        counts: dict[torch.dtype, int] = {}
        for dt in self.dtypes.values():
            if dt.is_floating_point:
                counts[dt] = counts.get(dt, 0) + 1
        return max(counts, key=counts.get) if counts else None


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}
_NAMES = {dt: name for name, dt in _DTYPES.items()}


class ShardWriter:
    """Write a checkpoint's tensors as they come: `add` streams each tensor's bytes to the shard being built and
    starts the next shard once `max_shard_bytes` is reached (0: every `add` is its own shard); `finish` names
    the shards `{stem}-0000i-of-0000n.safetensors` with an index, or a single `{stem}.safetensors` when there
    is one. No tensor is held after `add` returns, so memory does not depend on the shard size: the bytes go to
    a data file, and the shard is that file's contents behind its safetensors header, copied when it is closed."""

    def __init__(self, folder: str | os.PathLike, stem: str = "model", max_shard_bytes: int = 0) -> None:
        self.folder, self.stem, self.max_shard_bytes = Path(folder), stem, max_shard_bytes
        self._data = None  # the open data file of the shard being built
        self._entries: dict[str, dict] = {}  # its tensors' safetensors header entries
        self._offset = 0
        self._names: set[str] = set()
        self._shards: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def _data_path(self) -> Path:
        return self.folder / f"{self.stem}-part{len(self._shards) + 1:05d}.data"

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        """Stream tensors (moved to CPU, contiguous) to the current shard; close it once the size limit is reached."""
        for k, v in tensors.items():
            if k in self._names:
                raise ShardError(f"tensor {k!r} written twice")
            t = v.detach().to("cpu").contiguous()
            if self._data is None:
                self._data = open(self._data_path(), "wb")  # noqa: SIM115 - closed by flush
            nbytes = t.numel() * t.element_size()
            if nbytes:
                self._data.write(t.reshape(-1).view(torch.uint8).numpy())
            self._entries[k] = {"dtype": _NAMES[t.dtype], "shape": list(t.shape),
                                "data_offsets": [self._offset, self._offset + nbytes]}
            self._offset += nbytes
            self._names.add(k)
        if self._offset >= self.max_shard_bytes:
            self.flush()

    def flush(self) -> None:
        """Close the shard being built: its header, then its tensors' bytes, as one safetensors file."""
        if self._data is None:
            return
        self._data.close()
        data, self._data = self._data_path(), None
        path = self.folder / f"{self.stem}-part{len(self._shards) + 1:05d}.safetensors"
        header = json.dumps({"__metadata__": {"format": "pt"}, **self._entries}, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)  # the tensors start 8-byte aligned, as safetensors writes them
        with open(path, "wb") as out, open(data, "rb") as src:
            out.write(struct.pack("<Q", len(header)))
            out.write(header)
            shutil.copyfileobj(src, out, 16 << 20)
        data.unlink()
        self._shards.append((path, list(self._entries)))
        self.total_bytes += self._offset
        self._entries, self._offset = {}, 0

    def finish(self) -> list[Path]:
        """Flush, give the shards their final names and write the index; returns the files written."""
        self.flush()
        n = len(self._shards)
        if n == 0:
            raise ShardError("no tensors were written")
        if n == 1:
            final = self.folder / f"{self.stem}.safetensors"
            os.replace(self._shards[0][0], final)
            return [final]
        weight_map, files = {}, []
        for i, (path, names) in enumerate(self._shards, start=1):
            final = self.folder / f"{self.stem}-{i:05d}-of-{n:05d}.safetensors"
            os.replace(path, final)
            files.append(final)
            weight_map.update({k: final.name for k in names})
        index = self.folder / f"{self.stem}.safetensors.index.json"
        with open(index, "w", encoding="utf-8") as f:
            json.dump({"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}, f, indent=2)
        return [*files, index]

