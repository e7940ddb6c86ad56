"""Streaming safetensors I/O for Hugging Face checkpoints (single file or sharded with an index).

Reading parses every shard's header up front (names, dtypes, shapes, offsets; the file size is checked against the
offsets so truncated files fail before any conversion) and then reads one tensor at a time with plain file reads
(no mmap, so pages of tensors already converted do not stay resident). Writing computes the whole header from the
planned names/shapes/dtypes first, then streams each tensor's bytes as it is produced: a shard never exists in
memory as a whole.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from dms_megatron.families import ConversionError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
MAX_HEADER_BYTES = 100 * 1024 * 1024

# safetensors dtype tag <-> torch dtype
ST_TO_TORCH = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
TORCH_TO_ST = {v: k for k, v in ST_TO_TORCH.items()}
#: dtype names of the converter's --dtype flags and of HF config.json's torch_dtype
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file, dtype, shape and absolute byte range in the file."""

    file: Path
    dtype: torch.dtype
    shape: Tuple[int, ...]
    begin: int
    end: int


def _read_header(path: Path) -> Tuple[Dict[str, TensorInfo], Dict[str, str]]:
    """Parse one safetensors file's header; ConversionError naming the file if it is corrupt or truncated."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ConversionError(f"{path} is corrupt: shorter than the 8-byte safetensors header length")
        (n,) = struct.unpack("<Q", raw)
        if n == 0 or n > MAX_HEADER_BYTES or 8 + n > size:
            raise ConversionError(f"{path} is corrupt: header length {n} does not fit the file size {size}")
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConversionError(f"{path} is corrupt: its safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise ConversionError(f"{path} is corrupt: its safetensors header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    base = 8 + n
    infos: Dict[str, TensorInfo] = {}
    for name, h in header.items():
        try:
            dtype = ST_TO_TORCH[h["dtype"]]
            shape = tuple(int(x) for x in h["shape"])
            b, e = (int(x) for x in h["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ConversionError(f"{path} is corrupt: bad header entry for tensor {name!r}: {h!r}"[:300]) from None
        numel = 1
        for d in shape:
            numel *= d
        if e - b != numel * torch.empty((), dtype=dtype).element_size() or b < 0:
            raise ConversionError(f"{path} is corrupt: tensor {name!r} byte range {b}..{e} does not match "
                                  f"shape {list(shape)} {h['dtype']}")
        if base + e > size:
            raise ConversionError(f"{path} is truncated: tensor {name!r} ends at byte {base + e} "
                                  f"but the file has {size} bytes")
        infos[name] = TensorInfo(path, dtype, shape, base + b, base + e)
    return infos, meta


class SafetensorsReader:
    """All tensors of a HF checkpoint directory (``model.safetensors`` or an index + shards), read lazily."""

    def __init__(self, directory) -> None:
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise ConversionError(f"{self.directory} is not a directory (a Hugging Face model directory was expected)")
        index = self.directory / INDEX_NAME
        single = self.directory / SINGLE_NAME
        self.infos: Dict[str, TensorInfo] = {}
        self.metadata: Dict[str, str] = {}
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ConversionError(f"{index} is corrupt: expected JSON with a 'weight_map' ({e})") from None
            for fname in sorted(set(weight_map.values())):
                shard = self.directory / fname
                if not shard.is_file():
                    raise ConversionError(f"{index} lists shard {fname} which does not exist in {self.directory}")
                infos, meta = _read_header(shard)
                for name, info in infos.items():
                    if weight_map.get(name) != fname:
                        raise ConversionError(f"{shard} holds tensor {name!r} which {index} does not map to it")
                    self.infos[name] = info
                self.metadata.update(meta)
            missing = sorted(set(weight_map) - set(self.infos))
            if missing:
                raise ConversionError(f"{index} maps tensor {missing[0]!r} to {weight_map[missing[0]]} "
                                      f"but that shard does not contain it ({len(missing)} such tensors)")
        elif single.is_file():
            self.infos, self.metadata = _read_header(single)
        else:
            bins = sorted(p.name for p in self.directory.glob("*.bin"))
            hint = f" (found {bins[0]}: re-save it with safe_serialization=True)" if bins else ""
            raise ConversionError(f"{self.directory} has neither {SINGLE_NAME} nor {INDEX_NAME}{hint}")

    def names(self) -> List[str]:
        return list(self.infos)

    def __contains__(self, name: str) -> bool:
        return name in self.infos

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor from disk (a fresh CPU tensor of the stored dtype and shape)."""
        info = self.infos.get(name)
        if info is None:
            raise ConversionError(f"tensor {name!r} is missing from {self.directory}")
        nbytes = info.end - info.begin
        buf = bytearray(nbytes)
        with open(info.file, "rb") as f:
            f.seek(info.begin)
            if f.readinto(buf) != nbytes:
                raise ConversionError(f"{info.file} is truncated while reading tensor {name!r}")
        if nbytes == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        return torch.frombuffer(buf, dtype=info.dtype).reshape(info.shape)

    def total_bytes(self) -> int:
        return sum(i.end - i.begin for i in self.infos.values())


# ---------------------------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PlannedTensor:
    """A tensor to write: its name, shape and dtype are known before its data is computed."""

    name: str
    shape: Tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = torch.empty((), dtype=self.dtype).element_size()
        for d in self.shape:
            n *= d
        return n


def plan_shards(plan: Sequence[PlannedTensor], max_shard_bytes: int) -> List[List[PlannedTensor]]:
    """Greedy split of the plan (in order) into shards of at most max_shard_bytes (a bigger tensor gets its own)."""
    shards: List[List[PlannedTensor]] = [[]]
    size = 0
    for t in plan:
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return [s for s in shards if s]


def _header_bytes(tensors: Sequence[PlannedTensor], metadata: Optional[Dict[str, str]]) -> bytes:
    header: dict = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    off = 0
    for t in tensors:
        header[t.name] = {"dtype": TORCH_TO_ST[t.dtype], "shape": list(t.shape), "data_offsets": [off, off + t.nbytes]}
        off += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw


def write_safetensors_streaming(directory, plan: Sequence[PlannedTensor], produce: Callable[[str], torch.Tensor],
                                *, max_shard_bytes: int = 5 * 1024 ** 3, metadata: Optional[Dict[str, str]] = None,
                                progress: Optional[Callable[[int], None]] = None) -> List[Path]:
    """Write ``plan`` into ``directory`` as safetensors shards, computing each tensor with ``produce(name)`` just
    before its bytes are written (produce may return tensors in any order-independent way; each is checked against
    its planned shape and dtype). Writes ``model.safetensors`` or ``model-0000i-of-0000n.safetensors`` + index.
    ``progress(nbytes)`` is called after each tensor is written.
    """
    directory = Path(directory)
    metadata = {"format": "pt", **(metadata or {})}
    shards = plan_shards(plan, max_shard_bytes)
    n = len(shards)
    names = [SINGLE_NAME] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map = {}
    paths = []
    for fname, tensors in zip(names, shards):
        path = directory / fname
        with open(path, "wb") as f:
            f.write(_header_bytes(tensors, metadata))
            for t in tensors:
                x = produce(t.name)
                if tuple(x.shape) != tuple(t.shape) or x.dtype != t.dtype:
                    raise ConversionError(f"tensor {t.name!r} was planned as {list(t.shape)} {t.dtype} but computed "
                                          f"as {list(x.shape)} {x.dtype} (mapping bug)")
                x = x.detach().contiguous().cpu()
                if x.numel():
                    f.write(x.reshape(-1).view(torch.uint8).numpy().tobytes())
                if progress is not None:
                    progress(x.numel() * x.element_size())
                del x
                weight_map[t.name] = fname
        paths.append(path)
    if n > 1:
        total = sum(t.nbytes for t in plan)
        (directory / INDEX_NAME).write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    return paths


def read_config(directory) -> dict:
    """The HF ``config.json`` of ``directory`` as a dict; ConversionError naming the file if absent or corrupt."""
    p = Path(directory) / "config.json"
    if not p.is_file():
        raise ConversionError(f"{p} does not exist: not a Hugging Face model directory")
    try:
        cfg = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"{p} is not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ConversionError(f"{p} is not a JSON object")
    return cfg


def iter_side_files(directory) -> Iterator[Path]:
    """Tokenizer / generation files to copy alongside converted weights (everything but weights and config)."""
    for p in sorted(Path(directory).iterdir()):
        if p.is_file() and p.name != "config.json" and not p.name.endswith((".safetensors", ".bin", ".pt")) \
                and p.name != INDEX_NAME:
            yield p


def check_output_dir(path) -> Path:
    """``path`` must not exist or be an empty directory; returns it as a Path."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ConversionError(f"output {path} already exists and is not empty: choose a new path or delete it")
    return path


def finalize_output(tmp: Path, final: Path) -> None:
    """Move a completed temporary output into place (``final`` may be an empty directory)."""
    if final.exists():
        final.rmdir()
    os.replace(tmp, final)


__all__ = ["ConversionError", "DTYPES", "SafetensorsReader", "PlannedTensor", "write_safetensors_streaming", "read_config",
           "plan_shards", "iter_side_files", "check_output_dir", "finalize_output", "TensorInfo"]
