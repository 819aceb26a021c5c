"""Importance matrix: collect it from the 16-bit HF model, write and read llama.cpp's imatrix file.

What llama.cpp's quantizer uses (`llama_model_quantize_params.imatrix`) is, per GGUF weight name,
the mean of the squared input activations of every input column: Σ x² / count over the tokens
seen. `collect` computes the sums and counts with forward pre-hooks on every `nn.Linear` of the
transformers model, one chunk of tokens at a time (memory: the model plus one chunk's activations).
A model that would not fit comfortably in memory (over STREAM_FRACTION of what is available) is
collected layer by layer instead (`collect_streaming`: the skeleton on the meta device, one decoder
layer materialised from the safetensors shards at a time, every chunk's hidden states kept between
layers), with the same sums.

The file is llama-imatrix's GGUF: `general.type = imatrix`, `imatrix.datasets` (string array),
`imatrix.chunk_count`, `imatrix.chunk_size` (u32), and per weight two F32 tensors,
`<name>.in_sum2` (ggml shape n_per_row × n_experts) and `<name>.counts` (1 × n_experts), names
sorted. `read` also accepts llama-imatrix's legacy `.dat` binary, whose values are
mean × ncall with counts {ncall}.

Facts matched from llama.cpp (the version vendored by llama-cpp-python 0.3.36):
- llama-imatrix collects the matrix multiplications whose weight is `blk.*`, plus `output.weight`
  only with `--process-output`. A tied model has no `output.weight`: its head multiplies by
  `token_embd.weight`, which llama-imatrix never collects, and llama-quantize never asks an
  imatrix for `token_embd`/`output` to be present (they are exempt from the imatrix requirement).
  `collect` does the same for tied models; for untied ones it collects `output.weight` by default
  (`include_output`), which llama-quantize uses when quantizing the head.
- llama-quantize's `load_imatrix` divides sums by counts per expert and puts 1 where a count is
  0 (`means`). For a legacy file it divides by ncall, leaving values as they are when ncall is 0.
- Rows of Q/K are permuted by the GGUF writer (RoPE layout); input columns are not, so the
  per-column statistics need no permutation.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from edgezh.errors import UserError

IN_SUM2 = ".in_sum2"
COUNTS = ".counts"


@dataclass
class ImatrixData:
    """Raw statistics per GGUF weight name: `sums[name]` is float64 of shape (n_experts, n_per_row)
    (Σ x² per input column), `counts[name]` of shape (n_experts,) (tokens seen)."""

    sums: dict[str, np.ndarray] = field(default_factory=dict)
    counts: dict[str, np.ndarray] = field(default_factory=dict)
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0
    legacy: bool = False  # read from a legacy .dat: sums hold mean × ncall, counts {ncall}

    def __len__(self) -> int:
        return len(self.sums)


# --- names -------------------------------------------------------------------------------------------


def gguf_weight_name(hf_module: str, n_layers: int) -> str | None:
    """The GGUF weight name of an HF Llama module (`model.layers.3.self_attn.q_proj` →
    `blk.3.attn_q.weight`), by the GGUF writer's own name map (`hf_to_gguf_name`); None if it has none."""
    from edgezh.export.gguf_writer import hf_to_gguf_name

    return hf_to_gguf_name(hf_module + ".weight", n_layers)


def linear_names(model: Any, *, tied: bool, include_output: bool = True) -> dict[str, str]:
    """HF module name → GGUF weight name for every `nn.Linear` of `model` that llama.cpp quantizes
    with an imatrix. A tied head is left out (see the module docstring); so is an untied one when
    `include_output` is false (llama-imatrix's default). An unknown linear layer is an error."""
    import torch

    n_layers = int(model.config.num_hidden_layers)
    out: dict[str, str] = {}
    for hf_name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        if hf_name == "lm_head" and (tied or not include_output):
            continue
        name = gguf_weight_name(hf_name, n_layers)
        if name is None:
            raise UserError(f"linear layer {hf_name} has no place in a llama GGUF; cannot collect an imatrix for it")
        out[hf_name] = name
    return out


# --- collecting ----------------------------------------------------------------------------------------


def _pick_device_dtype(model_dir: Path, device: str | None, dtype: Any) -> tuple[str, Any]:
    import json

    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype is None:
        if device.startswith("cuda"):
            dtype = torch.bfloat16
        else:
            # float32 on a CPU when it fits comfortably (small models); bf16 for big ones
            size = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
            try:
                stored = json.loads((model_dir / "config.json").read_text(encoding="utf-8")).get("torch_dtype")
            except (OSError, ValueError):
                stored = None
            per_param = 4 if stored == "float32" else 2
            dtype = torch.float32 if size / per_param * 4 < 8 * 2**30 else torch.bfloat16
    return device, dtype


class _Sums:
    """Σ x² per input column (float64, on the activations' device) and rows seen, per GGUF weight name."""

    def __init__(self) -> None:
        self.sums: dict[str, Any] = {}
        self.counts: dict[str, int] = {}

    def add(self, gguf_name: str, x: Any) -> None:
        import torch

        x = x.detach()
        x = x.reshape(-1, x.shape[-1])
        sq = x.to(torch.float64).square().sum(0)
        if gguf_name in self.sums:
            self.sums[gguf_name] += sq
        else:
            self.sums[gguf_name] = sq
        self.counts[gguf_name] = self.counts.get(gguf_name, 0) + int(x.shape[0])

    def hook_for(self, gguf_name: str) -> Callable:
        """A forward pre-hook adding the module's input to `gguf_name`'s sums."""
        def hook(_module: Any, args: tuple) -> None:
            self.add(gguf_name, args[0])
        return hook

    def data(self, datasets: Sequence[str], chunk_count: int, chunk_size: int) -> ImatrixData:
        data = ImatrixData(datasets=list(datasets), chunk_count=chunk_count, chunk_size=chunk_size)
        for name in sorted(self.sums):
            data.sums[name] = self.sums[name].cpu().numpy().reshape(1, -1)
            data.counts[name] = np.array([self.counts[name]], dtype=np.float64)
        return data


# Stream layer by layer when the whole model, in the dtype it would be loaded in, needs more than this
# fraction of the memory available now.
STREAM_FRACTION = 0.4


def available_memory() -> int:
    """Bytes of memory available to a new allocation now (psutil's `available`)."""
    import psutil

    return int(psutil.virtual_memory().available)


def weights_bytes(model_dir: Path, dtype: Any) -> int:
    """Bytes the floating-point weights in `model_dir`'s safetensors take once loaded as `dtype`
    (integer tensors as stored), from the headers only."""
    from edgezh.export.merge import base_shards
    from edgezh.export.tensor_stream import CODES, numel
    from edgezh.models.resolve import check_safetensors

    total = 0
    for shard in base_shards(Path(model_dir)):
        for info in check_safetensors(shard).values():
            stored = CODES.get(info["dtype"])
            size = dtype.itemsize if stored is not None and stored.is_floating_point else (stored.itemsize if stored else 1)
            total += numel(info["shape"]) * size
    return total


def should_stream(model_dir: Path, dtype: Any, *, available: int | None = None) -> bool:
    """Whether `collect` should stream: the whole model as `dtype` over STREAM_FRACTION of `available`
    (default: the memory available now)."""
    available = available_memory() if available is None else available
    return weights_bytes(model_dir, dtype) > STREAM_FRACTION * available


def collect(model_dir: Path, chunks: Iterable[Sequence[int]], *, device: str | None = None, dtype: Any = None,
            include_output: bool = True, datasets: Sequence[str] = (),
            progress: Callable[[int, int], None] | None = None, model: Any = None,
            stream: bool | None = None, layer_progress: Callable[[int, int], None] | None = None) -> ImatrixData:
    """Σ x² per input column and token counts of every linear layer of the HF Llama in `model_dir`,
    over `chunks` (lists of token ids, each one forward pass of batch 1, no cache).

    CUDA when available (bf16), else CPU (float32 for small models, bf16 for big ones). Sums are
    accumulated in float64 on the device. `progress(chunks_done, tokens_done)` after every chunk.
    `model` may be an already loaded transformers model (then `model_dir` is only named in errors).

    `stream`: run layer by layer (`collect_streaming`: memory ≈ one decoder layer) instead of
    loading the whole model; None (the default) streams when the model, in the dtype it would be
    loaded in, takes more than STREAM_FRACTION of the memory available now. Never with `model`.
    `layer_progress(layers_done, n_layers)` is called by the streaming path only."""
    import torch

    if model is None and stream is not False:
        _, full_dtype = _pick_device_dtype(Path(model_dir), device, dtype)
        if stream or should_stream(Path(model_dir), full_dtype):
            return collect_streaming(model_dir, chunks, device=device, dtype=dtype, include_output=include_output,
                                     datasets=datasets, progress=progress, layer_progress=layer_progress)
    device, dtype = _pick_device_dtype(Path(model_dir), device, dtype)
    if model is None:
        from transformers import AutoModelForCausalLM

        try:
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
        except (OSError, ValueError) as exc:
            raise UserError(f"{model_dir}: cannot load the model for the imatrix ({exc})") from None
        model.to(device)
    model.eval()
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    names = linear_names(model, tied=tied, include_output=include_output)
    sums = _Sums()
    modules = dict(model.named_modules())
    handles = [modules[hf].register_forward_pre_hook(sums.hook_for(g)) for hf, g in names.items()]
    n_chunks = n_tokens = 0
    sizes: set[int] = set()
    # the head's logits are only computed when its input is wanted
    run = model if (include_output and not tied) else model.model
    try:
        with torch.no_grad():
            for chunk in chunks:
                ids = torch.tensor([list(chunk)], dtype=torch.long, device=device)
                if ids.shape[1] == 0:
                    continue
                run(input_ids=ids, use_cache=False)
                n_chunks += 1
                n_tokens += int(ids.shape[1])
                sizes.add(int(ids.shape[1]))
                if progress is not None:
                    progress(n_chunks, n_tokens)
    finally:
        for h in handles:
            h.remove()
    if n_chunks == 0:
        raise UserError(f"{model_dir}: no calibration tokens to compute an imatrix from")
    return sums.data(datasets, n_chunks, max(sizes))


class _TensorIndex:
    """Where each tensor of a safetensors checkpoint is (shard, data start, header entry); reads one tensor
    at a time with positioned reads (`tensor_stream.read_tensor`: no memory map stays resident)."""

    def __init__(self, model_dir: Path):
        from edgezh.export.merge import base_shards
        from edgezh.models.resolve import check_safetensors

        self.model_dir = model_dir
        self.where: dict[str, tuple[Path, int, dict]] = {}
        for shard in base_shards(model_dir):
            header = check_safetensors(shard)
            with open(shard, "rb") as f:
                data_start = 8 + struct.unpack("<Q", f.read(8))[0]
            for name, info in header.items():
                self.where[name] = (shard, data_start, info)

    def entry(self, name: str) -> tuple[Path, int, dict]:
        if name not in self.where:
            raise UserError(f"{self.model_dir}: the safetensors weights have no tensor {name}; cannot stream the imatrix")
        return self.where[name]

    def read(self, name: str) -> Any:
        from edgezh.export.tensor_stream import read_tensor

        shard, data_start, info = self.entry(name)
        with open(shard, "rb") as f:
            return read_tensor(f, data_start, info, f"{shard}: {name}")

    def rows(self, name: str, ids: Any) -> Any:
        """Rows `ids` (sorted, unique) of a 2-D tensor, each read on its own."""
        import torch

        from edgezh.export.tensor_stream import CODES, read_exact

        shard, data_start, info = self.entry(name)
        n_rows, width = info["shape"]
        dtype = CODES[info["dtype"]]
        bad = [int(i) for i in ids if not 0 <= int(i) < n_rows]
        if bad:
            raise UserError(f"calibration token id {bad[0]} is outside the vocabulary of {self.model_dir} ({n_rows} tokens)")
        out = torch.empty((len(ids), width), dtype=dtype)
        row_bytes = width * dtype.itemsize
        with open(shard, "rb") as f:
            for k, i in enumerate(ids):
                read_exact(f, data_start + info["data_offsets"][0] + int(i) * row_bytes, out[k], f"{shard}: {name}")
        return out


def _trim_heap() -> None:
    """Hand freed heap memory back to the system (glibc's `malloc_trim`; nothing elsewhere).

    A layer's tensors under glibc's mmap threshold (≤ 32 MiB: K/V projections, activations) live in
    malloc's arenas; freed between layers they fragment them, and without a trim the process kept
    ~150 MiB more per layer (4.6 GiB peak over Llama 3 8B's 32 layers instead of ~1.6 GiB)."""
    import ctypes
    import ctypes.util

    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC: Any = None


def _materialise(module: Any, prefix: str, index: _TensorIndex, device: str) -> None:
    """Give a meta-device module real storage on `device` and fill its parameters from the checkpoint."""
    import torch

    module.to_empty(device=device)
    with torch.no_grad():
        for name, param in module.named_parameters():
            param.copy_(index.read(prefix + name))
    leftover = [name for name, buf in module.named_buffers() if buf is not None]
    if leftover:  # a Llama decoder layer or norm has none; anything else is not what this path knows
        raise UserError(f"{index.model_dir}: {prefix}{leftover[0]} is a buffer the imatrix stream cannot restore")


def collect_streaming(model_dir: Path, chunks: Iterable[Sequence[int]], *, device: str | None = None, dtype: Any = None,
                      include_output: bool = True, datasets: Sequence[str] = (),
                      progress: Callable[[int, int], None] | None = None,
                      layer_progress: Callable[[int, int], None] | None = None) -> ImatrixData:
    """`collect`, one decoder layer in memory at a time: the same sums, whatever the model's size.

    The model is built on the meta device (no storage). The embedding rows of the calibration tokens
    are read, then every decoder layer in turn is materialised from the safetensors shards, runs
    every chunk's hidden states (kept for all chunks: chunks × tokens × hidden in `dtype`) with that
    chunk's rotary embeddings (the model's own rotary module) and causal mask, as transformers'
    LlamaModel.forward does, and is freed; then the final norm gives the head's input, whose sums are
    taken directly (the head's logits are never computed, so the head is never read). Peak memory ≈
    one decoder layer in `dtype` + its largest tensor as stored + the hidden states (the heap is
    trimmed after every layer, see `_trim_heap`).

    `dtype` None: float32 on a CPU (only one layer is held), bf16 on CUDA. `progress(chunks_done,
    tokens_done)` once per chunk after the last layer; `layer_progress(layers_done, n_layers)`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.masking_utils import create_causal_mask

    model_dir = Path(model_dir)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype is None:
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    try:
        config = AutoConfig.from_pretrained(model_dir)
    except (OSError, ValueError) as exc:
        raise UserError(f"{model_dir}: cannot read the model's config for the imatrix ({exc})") from None
    if config.model_type != "llama":
        raise UserError(f"{model_dir}: streaming the imatrix knows the llama architecture only, not {config.model_type!r}; "
                        "pass stream=False to load the whole model")
    index = _TensorIndex(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    inner = model.model
    # the rotary module's inv_freq is a computed buffer: build the model's own class for real, off the meta device
    rotary = type(inner.rotary_emb)(config=model.config).to(device)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    names = linear_names(model, tied=tied, include_output=include_output)
    head_name = names.pop("lm_head", None)
    sums = _Sums()
    modules = dict(model.named_modules())
    handles = [modules[hf].register_forward_pre_hook(sums.hook_for(g)) for hf, g in names.items()]

    ids_list = [list(c) for c in chunks]
    ids_list = [c for c in ids_list if c]
    if not ids_list:
        raise UserError(f"{model_dir}: no calibration tokens to compute an imatrix from")
    with torch.no_grad():
        flat = torch.tensor([t for c in ids_list for t in c], dtype=torch.long)
        unique, inverse = torch.unique(flat, sorted=True, return_inverse=True)
        rows = index.rows("model.embed_tokens.weight", unique.tolist()).to(device=device, dtype=dtype)
        hidden, positions, rope, masks = [], [], [], []
        start = 0
        for c in ids_list:
            h = rows[inverse[start:start + len(c)].to(device)].unsqueeze(0)
            start += len(c)
            pos = torch.arange(len(c), device=device).unsqueeze(0)
            hidden.append(h)
            positions.append(pos)
            rope.append(rotary(h, position_ids=pos))
            masks.append(create_causal_mask(config=model.config, inputs_embeds=h, attention_mask=None, cache=None,
                                            position_ids=pos))
        del rows
        n_layers = int(model.config.num_hidden_layers)
        try:
            for i in range(n_layers):
                layer = inner.layers[i]
                _materialise(layer, f"model.layers.{i}.", index, device)
                for c in range(len(hidden)):
                    hidden[c] = layer(hidden[c], attention_mask=masks[c], position_ids=positions[c], cache=None,
                                      use_cache=False, position_embeddings=rope[c])
                layer.to_empty(device="meta")  # frees the layer's storage
                _trim_heap()
                if layer_progress is not None:
                    layer_progress(i + 1, n_layers)
        finally:
            for handle in handles:
                handle.remove()
        _materialise(inner.norm, "model.norm.", index, device)
        n_tokens = 0
        for c in range(len(hidden)):
            if head_name is not None:
                sums.add(head_name, inner.norm(hidden[c]))  # exactly what lm_head's pre-hook would see
            n_tokens += hidden[c].shape[1]
            if progress is not None:
                progress(c + 1, n_tokens)
    return sums.data(datasets, len(ids_list), max(len(c) for c in ids_list))


def token_chunks(ids: Sequence[int], chunk_size: int, *, bos_id: int | None = None,
                 max_tokens: int | None = None) -> list[list[int]]:
    """Cut a token stream into chunks of `chunk_size` (the last partial one dropped, as
    llama-imatrix does), each starting with `bos_id` when the model has one."""
    step = chunk_size - (1 if bos_id is not None else 0)
    if step <= 0:
        raise UserError(f"imatrix chunk size {chunk_size} is too small")
    if max_tokens is not None:
        ids = ids[: max_tokens]
    out = []
    for start in range(0, len(ids) - step + 1, step):
        piece = list(ids[start:start + step])
        out.append(([bos_id] if bos_id is not None else []) + piece)
    return out


# --- the file -------------------------------------------------------------------------------------------


def write_gguf(path: Path, data: ImatrixData, datasets: Sequence[str] | None = None, chunk_count: int | None = None,
               chunk_size: int | None = None) -> Path:
    """Write `data` as llama-imatrix's GGUF file (atomically); None arguments come from `data`."""
    import os

    import gguf

    path = Path(path)
    datasets = list(data.datasets if datasets is None else datasets)
    chunk_count = data.chunk_count if chunk_count is None else chunk_count
    chunk_size = data.chunk_size if chunk_size is None else chunk_size
    if data.legacy:
        raise UserError(f"{path}: cannot write a legacy imatrix as GGUF (its raw counts are unknown)")
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".part")
    writer = gguf.GGUFWriter(part, arch="imatrix")
    # llama-imatrix writes no general.architecture: drop the key gguf-py's writer adds by itself
    for kv in writer.kv_data:
        kv.pop(gguf.Keys.General.ARCHITECTURE, None)
    writer.add_type(gguf.GGUFType.IMATRIX)
    writer.add_array(gguf.Keys.IMatrix.DATASETS, datasets)
    writer.add_uint32(gguf.Keys.IMatrix.CHUNK_COUNT, int(chunk_count))
    writer.add_uint32(gguf.Keys.IMatrix.CHUNK_SIZE, int(chunk_size))
    for name in sorted(data.sums):
        sums = np.asarray(data.sums[name], dtype=np.float32)
        counts = np.asarray(data.counts[name], dtype=np.float32).reshape(-1)
        n_exp = counts.shape[0]
        # numpy (n_experts, n_per_row) = ggml ne (n_per_row, n_experts); counts ggml (1, n_experts)
        writer.add_tensor(name + IN_SUM2, sums.reshape(n_exp, -1))
        writer.add_tensor(name + COUNTS, counts.reshape(n_exp, 1))
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    os.replace(part, path)
    return path


def read(path: Path) -> ImatrixData:
    """An imatrix file: llama-imatrix's GGUF (or edgezh's, the same), or its legacy `.dat`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such imatrix file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        return _read_gguf(path)
    return _read_legacy(path)


def _read_gguf(path: Path) -> ImatrixData:
    import gguf

    from edgezh.gguf_meta import read_metadata

    # the header first, without parsing a model's vocabulary (gguf-py takes seconds on 128k tokens)
    head = read_metadata(path, [gguf.Keys.General.TYPE, gguf.Keys.General.ARCHITECTURE])
    kind = head.get(gguf.Keys.General.TYPE)
    if kind is not None and kind != gguf.GGUFType.IMATRIX:
        raise UserError(f"{path}: a GGUF of general.type {kind!r}, not an imatrix (llama-imatrix writes general.type = imatrix)")
    if kind is None and head.get(gguf.Keys.General.ARCHITECTURE) is not None:
        raise UserError(f"{path}: a model GGUF (general.architecture = {head[gguf.Keys.General.ARCHITECTURE]!r}), "
                        "not an imatrix (llama-imatrix writes general.type = imatrix)")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as exc:  # gguf-py raises ValueError, struct.error, IndexError… on a broken file
        raise UserError(f"{path}: not a readable GGUF file ({exc})") from None

    def value(key: str) -> Any:
        fld = reader.get_field(key)
        return None if fld is None else fld.contents()

    missing = [k for k in (gguf.Keys.IMatrix.DATASETS, gguf.Keys.IMatrix.CHUNK_COUNT, gguf.Keys.IMatrix.CHUNK_SIZE)
               if reader.get_field(k) is None]
    if missing:
        raise UserError(f"{path}: not an imatrix GGUF: no {', '.join(missing)} (llama-quantize refuses it too)")
    data = ImatrixData(datasets=[str(s) for s in value(gguf.Keys.IMatrix.DATASETS)],
                       chunk_count=int(value(gguf.Keys.IMatrix.CHUNK_COUNT)),
                       chunk_size=int(value(gguf.Keys.IMatrix.CHUNK_SIZE)))
    pairs: dict[str, dict[str, Any]] = {}
    for tensor in reader.tensors:
        for suffix in (IN_SUM2, COUNTS):
            if tensor.name.endswith(suffix):
                if tensor.tensor_type != gguf.GGMLQuantizationType.F32:
                    raise UserError(f"{path}: tensor {tensor.name} is {tensor.tensor_type.name}; imatrix tensors must be F32")
                pairs.setdefault(tensor.name[: -len(suffix)], {})[suffix] = tensor
                break
    if not pairs:
        raise UserError(f"{path}: the imatrix GGUF holds no <name>.in_sum2 / <name>.counts tensors")
    for name, pair in sorted(pairs.items()):
        if IN_SUM2 not in pair or COUNTS not in pair:
            raise UserError(f"{path}: {name} has {'in_sum2' if IN_SUM2 in pair else 'counts'} but not "
                            f"{'counts' if IN_SUM2 in pair else 'in_sum2'}")
        counts = np.array(pair[COUNTS].data, dtype=np.float64).reshape(-1)
        sums = np.array(pair[IN_SUM2].data, dtype=np.float64).reshape(-1)
        if counts.size == 0 or sums.size % counts.size:
            raise UserError(f"{path}: {name}: {sums.size} sums do not split into {counts.size} experts")
        data.sums[name] = sums.reshape(counts.size, -1)
        data.counts[name] = np.round(counts)
    return data


def _read_legacy(path: Path) -> ImatrixData:
    raw = path.read_bytes()
    pos = 0

    def take(fmt: str) -> tuple:
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(raw):
            raise UserError(f"{path}: neither a GGUF nor a complete legacy llama-imatrix .dat file (truncated at byte {pos})")
        out = struct.unpack_from(fmt, raw, pos)
        pos += size
        return out

    (n_entries,) = take("<i")
    if n_entries < 1 or n_entries > 1_000_000:
        raise UserError(f"{path}: neither a GGUF nor a legacy llama-imatrix .dat file (entry count {n_entries})")
    data = ImatrixData(legacy=True)
    for i in range(n_entries):
        (length,) = take("<i")
        if length <= 0 or length > 4096:
            raise UserError(f"{path}: not a legacy imatrix file (entry {i + 1} has a name of {length} bytes)")
        name = take(f"<{length}s")[0].decode("utf-8", "replace")
        ncall, nval = take("<ii")
        if nval < 1:
            raise UserError(f"{path}: legacy imatrix entry {name} has {nval} values")
        values = np.frombuffer(raw, dtype="<f4", count=nval, offset=pos) if pos + 4 * nval <= len(raw) else None
        if values is None:
            raise UserError(f"{path}: legacy imatrix entry {name} is truncated")
        pos += 4 * nval
        data.sums[name] = values.astype(np.float64).reshape(1, -1)
        data.counts[name] = np.array([ncall], dtype=np.float64)
    if pos < len(raw):  # optional trailer: chunk count, dataset name
        (data.chunk_count,) = take("<i")
        if pos + 4 <= len(raw):
            (length,) = take("<i")
            if length > 0 and pos + length <= len(raw):
                data.datasets = [take(f"<{length}s")[0].decode("utf-8", "replace")]
    return data


def means(data: ImatrixData) -> dict[str, np.ndarray]:
    """What llama-quantize hands the quantizer: per weight, sums / count per expert (1.0 where a
    count is 0), flattened to n_experts × n_per_row float32."""
    out: dict[str, np.ndarray] = {}
    for name, sums in data.sums.items():
        counts = np.asarray(data.counts[name], dtype=np.float64).reshape(-1, 1)
        sums = np.asarray(sums, dtype=np.float64).reshape(counts.shape[0], -1)
        if data.legacy:  # values are mean × ncall; ncall 0 leaves them as stored
            e = np.where(counts > 0, sums / np.where(counts > 0, counts, 1), sums)
        else:
            e = np.where(counts > 0, sums / np.where(counts > 0, counts, 1), 1.0)
        out[name] = np.ascontiguousarray(e.reshape(-1), dtype=np.float32)
    return out


def quantize_args(path: Path) -> dict[str, Any]:
    """Read an imatrix file into the keyword arguments of `edgezh.export.quantize.quantize`
    (`imatrix` and `imatrix_meta`), as llama-quantize --imatrix does."""
    data = read(path)
    return {"imatrix": means(data),
            "imatrix_meta": {"file": str(path), "datasets": data.datasets, "chunk_count": data.chunk_count}}
