"""HF Llama-family folder → GGUF for llama.cpp, one tensor at a time, with gguf-py.

``convert(model_dir, out_file, outtype, template=...)`` writes a GGUF that llama.cpp loads as ``llama``:

- **Streaming.** Shapes and dtypes come from the safetensors headers, so every tensor's GGUF type and
  size is planned before a byte is written (gguf-py's ``add_tensor_info``); the header, metadata and
  tensor table are written, then each tensor is read, transformed, encoded and written on its own
  (``write_tensor_data``) and dropped. Tensors are read with plain positioned reads: a memory-mapped
  read leaves every touched page of the source resident in this process (the whole model by the
  end). Q/K (permuted) and adapted tensors are read whole; every other tensor — embeddings and
  output head included — is read, encoded and written in chunks of rows, so the resident set stays
  at about one attention matrix. F16 converts straight from the source dtype; Q8_0/BF16 go through
  float32 chunk by chunk.
- **Layout.** Names come from gguf-py's ``TensorNameMap`` through ``hf_to_gguf_name`` (the imatrix uses it
  too); Q/K weights (and biases) are permuted from transformers' rotate-half RoPE layout to llama.cpp's
  interleaved one; 1-D tensors stay F32; Q8_0 is
  used only for 2-D tensors whose rows are a multiple of 32 (others fall back to F16 and are listed in
  the result). Llama 3.1 RoPE scaling (``rope_type: llama3``) becomes a ``rope_freqs`` tensor of
  per-frequency divisors; tied embeddings (Llama 3.2, SmolLM2) write no ``output.weight``.
- **Tokenizer.** GPT-2 style byte-level BPE from ``tokenizer.json``. The llama.cpp pre-tokenizer name is
  identified from the ``pre_tokenizer`` definition itself (see ``PRE_TOKENIZERS``): an unknown definition
  is an error, never a guess, because a wrong name silently changes how every text is split. BOS, UNK and PAD
  ids are read as llama.cpp's converter reads them (``_special_id``); a PAD that is a stop token is left out.
- **Metadata parity.** The keys llama.cpp's ``convert_hf_to_gguf.py`` writes for a Llama folder are written
  too (``key_length``/``value_length`` always, as its ``head_dim`` always exists), except where edgezh
  deliberately differs; ``tests/test_gguf_writer.py`` lists the keys and the differences.
- **Chat format.** The template registry is the only source: ``tokenizer.chat_template`` is the
  format's inference template, EOS/EOT are its first stop token, ``add_bos_token`` is its BOS rule.
- **Atomic.** The file is written to ``<out_file>.part`` and renamed; on any failure neither is left.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from edgezh import templates
from edgezh.errors import UserError
from edgezh.gguf_meta import PRE_TOKENIZERS
from edgezh.jsonl import read_json
from edgezh.models.resolve import check_safetensors, read_config

if TYPE_CHECKING:
    import torch

    from edgezh.export.lora import LoraAdapter

__all__ = ["PRE_TOKENIZERS", "SUPPORTED_OUTTYPES", "convert", "hf_to_gguf_name", "identify_pre_tokenizer",
           "llama3_rope_factors"]

SUPPORTED_OUTTYPES = ("f32", "f16", "bf16", "q8_0")

_ROPE_TYPES = ("default", "llama3")
_QUANT_CHUNK_VALUES = 1 << 22  # values encoded per chunk for Q8_0/BF16 (16 MiB of float32)

# --- pre-tokenizers (the definitions live in edgezh.gguf_meta) ---------------------------------------

_OFFSETS_ONLY_KEYS = {"trim_offsets"}


def _canonical(node: Any) -> Any:
    if isinstance(node, list):
        return [_canonical(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = {key: _canonical(value) for key, value in node.items() if key not in _OFFSETS_ONLY_KEYS}
    if node.get("type") == "Sequence" and isinstance(node.get("pretokenizers"), list) and len(node["pretokenizers"]) == 1:
        return node["pretokenizers"][0]
    return node


def identify_pre_tokenizer(tokenizer: dict[str, Any], path: Path) -> str:
    """The llama.cpp pre-tokenizer name for a parsed ``tokenizer.json``; UserError if it is none we know."""
    if tokenizer.get("normalizer") not in (None, {}):
        normalizer = tokenizer["normalizer"]
        kind = normalizer.get("type", "?") if isinstance(normalizer, dict) else normalizer
        raise UserError(f"{path}: the tokenizer has a {kind} normalizer, which llama.cpp's BPE tokenizer does not "
                        "apply; a GGUF of it would tokenize differently from transformers")
    definition = _canonical(tokenizer.get("pre_tokenizer"))
    for name, known in PRE_TOKENIZERS.items():
        if definition == _canonical(known):
            return name
    shown = json.dumps(tokenizer.get("pre_tokenizer"), ensure_ascii=False)
    if len(shown) > 300:
        shown = shown[:300] + "…"
    raise UserError(f"{path}: unknown pre_tokenizer definition {shown}; edgezh knows the definitions of "
                    f"llama.cpp's {', '.join(PRE_TOKENIZERS)} pre-tokenizers and will not guess another "
                    "(a wrong one silently changes how text is split)")


# --- config ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Hparams:
    n_layers: int
    hidden: int
    ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    context: int
    rms_eps: float
    rope_theta: float
    rope: dict[str, Any] | None  # llama3 scaling parameters, None for plain RoPE
    tied: bool


def _hparams(config: dict[str, Any], path: Path) -> _Hparams:
    def need(key: str) -> Any:
        if key not in config:
            raise UserError(f"{path}: missing {key!r}")
        return config[key]

    hidden, n_head = int(need("hidden_size")), int(need("num_attention_heads"))
    head_dim = int(config.get("head_dim") or hidden // n_head)
    # transformers 5 writes `rope_parameters` (with rope_theta inside); older configs have top-level
    # `rope_theta` and an optional `rope_scaling`. As in transformers, `rope_scaling` wins when both exist.
    rope = dict(config.get("rope_scaling") or config.get("rope_parameters") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in _ROPE_TYPES:
        raise UserError(f"{path}: rope_type {rope_type!r} is not supported (supported: {', '.join(_ROPE_TYPES)})")
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise UserError(f"{path}: partial_rotary_factor {rope['partial_rotary_factor']} is not supported")
    theta = next((value for value in (rope.get("rope_theta"), config.get("rope_theta"),
                                      (config.get("rope_parameters") or {}).get("rope_theta")) if value), 10000.0)
    return _Hparams(
        n_layers=int(need("num_hidden_layers")),
        hidden=hidden,
        ff=int(need("intermediate_size")),
        n_head=n_head,
        n_head_kv=int(config.get("num_key_value_heads") or n_head),
        head_dim=head_dim,
        context=int(need("max_position_embeddings")),
        rms_eps=float(config.get("rms_norm_eps", 1e-6)),
        rope_theta=float(theta),
        rope=rope if rope_type == "llama3" else None,
        tied=bool(config.get("tie_word_embeddings", False)),
    )


def llama3_rope_factors(theta: float, head_dim: int, rope: dict[str, Any]) -> np.ndarray:
    """Llama 3.1 RoPE scaling as llama.cpp applies it: one divisor per frequency (``rope_freqs``), so that
    ``base_freq / divisor`` is the scaled frequency transformers computes (``_compute_llama3_parameters``)."""
    factor = float(rope.get("factor", 8.0))
    low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    old_context = float(rope.get("original_max_position_embeddings", 8192))
    low_wavelen, high_wavelen = old_context / low, old_context / high
    divisors = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (i / head_dim)
        if wavelen < high_wavelen:
            divisors.append(1.0)
        elif wavelen > low_wavelen:
            divisors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            divisors.append(1.0 / ((1.0 - smooth) / factor + smooth))
    return np.asarray(divisors, dtype=np.float32)


# --- tokenizer ------------------------------------------------------------------------------------


@dataclass
class _Vocab:
    pre: str
    tokens: list[str]
    types: list[int]
    merges: list[str]
    ids: dict[str, int]  # every token text → id
    bos_id: int | None
    unk_id: int | None
    pad_id: int | None


def _token_content(entry: Any) -> str | None:
    if isinstance(entry, str):
        return entry
    if isinstance(entry, dict) and isinstance(entry.get("content"), str):
        return entry["content"]
    return None


def _special_id(kind: str, tokenizer_config: dict[str, Any], added: list[dict[str, Any]], config: dict[str, Any],
                n_vocab: int) -> int | None:
    """The id of special token `kind` ("bos", "unk", "pad") as llama.cpp's converter reads it (gguf-py's
    ``SpecialVocab``): tokenizer_config.json's ``<kind>_token`` looked up among tokenizer.json's added tokens
    (first match), else config.json's ``<kind>_token_id`` (or its ``text_config``'s). generation_config.json is
    not read. An id outside the embedding is dropped (llama.cpp would ignore it with a warning)."""
    text = _token_content(tokenizer_config.get(f"{kind}_token"))
    found = next((entry.get("id") for entry in added if entry.get("content") == text), None) if text else None
    if not isinstance(found, int):
        found = config.get(f"{kind}_token_id")
        if found is None and isinstance(config.get("text_config"), dict):
            found = config["text_config"].get(f"{kind}_token_id")
    if isinstance(found, bool) or not isinstance(found, int) or not 0 <= found < n_vocab:
        return None
    return found


def _read_vocab(model_dir: Path, n_vocab: int, config: dict[str, Any]) -> _Vocab:
    import gguf

    path = model_dir / "tokenizer.json"
    tokenizer = read_json(path)
    model = tokenizer.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        kind = f"{model.get('type')} model" + (" with byte fallback" if model.get("byte_fallback") else "")
        raise UserError(f"{path}: the tokenizer is a {kind}; the GGUF writer handles byte-level BPE (Llama 3, SmolLM2)")
    pre = identify_pre_tokenizer(tokenizer, path)

    tokens: list[str | None] = [None] * n_vocab
    types = [int(gguf.TokenType.NORMAL)] * n_vocab
    ids: dict[str, int] = {}

    def place(text: str, index: int, token_type: gguf.TokenType | None) -> None:
        if not 0 <= index < n_vocab:
            raise UserError(f"{path}: token {text!r} has id {index}, but the model's embedding has {n_vocab} rows")
        tokens[index] = text
        ids[text] = index
        if token_type is not None:
            types[index] = int(token_type)

    for text, index in model["vocab"].items():
        place(text, int(index), None)
    for added in tokenizer.get("added_tokens") or []:
        # special tokens are matched only when parsing specials; other added tokens always (USER_DEFINED)
        kind = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
        place(added["content"], int(added["id"]), kind)
    for index, text in enumerate(tokens):
        if text is None:  # embedding rows beyond the tokenizer (padded vocabularies)
            tokens[index] = f"[PAD{index}]"
            types[index] = int(gguf.TokenType.UNUSED)

    merges = []
    for merge in model.get("merges") or []:
        if isinstance(merge, str):
            merges.append(merge)
        else:  # [left, right] pairs (tokenizers ≥ 0.20); a literal space inside would make "a b" ambiguous
            merges.append(" ".join(part.replace(" ", "\u0120") for part in merge))

    tokenizer_config_path = model_dir / "tokenizer_config.json"
    tokenizer_config: dict[str, Any] = {}
    if tokenizer_config_path.is_file():
        tokenizer_config = read_json(tokenizer_config_path)
    added_tokens = [entry for entry in tokenizer.get("added_tokens") or [] if isinstance(entry, dict)]
    special = {kind: _special_id(kind, tokenizer_config, added_tokens, config, n_vocab)
               for kind in ("bos", "unk", "pad")}
    return _Vocab(pre=pre, tokens=tokens, types=types, merges=merges, ids=ids,  # type: ignore[arg-type]
                  bos_id=special["bos"], unk_id=special["unk"], pad_id=special["pad"])


# --- tensor names ---------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _name_map(n_layers: int) -> Any:
    import gguf

    return gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)


def _lookup(hf_tensor_name: str, n_layers: int) -> tuple[Any, str] | None:
    """(gguf.MODEL_TENSOR kind, GGUF name) of an HF tensor by gguf-py's llama map, None if it has none."""
    return _name_map(n_layers).get_type_and_name(hf_tensor_name, try_suffixes=(".weight", ".bias"))


def _computed_by_llama_cpp(hf_tensor_name: str, n_layers: int) -> bool:
    """A buffer llama.cpp computes itself (e.g. ``rotary_emb.inv_freq``): not written, and not an error."""
    import gguf

    found = _lookup(hf_tensor_name, n_layers)
    return found is not None and found[0] in set(gguf.MODEL_TENSOR_SKIP.get(gguf.MODEL_ARCH.LLAMA, ()))


def hf_to_gguf_name(hf_tensor_name: str, n_layers: int) -> str | None:
    """The GGUF name of an HF Llama tensor (``model.layers.3.self_attn.q_proj.weight`` → ``blk.3.attn_q.weight``,
    ``lm_head.weight`` → ``output.weight``), by gguf-py's tensor map for llama.cpp's ``llama`` architecture:
    the one map the writer and the imatrix use. None for a tensor with no place in a llama GGUF and for buffers
    llama.cpp computes itself (RoPE ``inv_freq``). Whether a tied model writes ``output.weight`` is the caller's
    decision; ``rope_freqs`` is computed by the writer, never mapped from a source tensor."""
    import gguf

    found = _lookup(hf_tensor_name, n_layers)
    if found is None or found[0] not in set(gguf.MODEL_TENSORS[gguf.MODEL_ARCH.LLAMA]):
        return None
    if found[0] in set(gguf.MODEL_TENSOR_SKIP.get(gguf.MODEL_ARCH.LLAMA, ())):
        return None
    return found[1]


# --- tensors --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Tensor:
    hf_name: str | None  # None for tensors computed here (rope_freqs)
    shard: Path | None
    name: str  # GGUF name
    shape: tuple[int, ...]  # numpy order (rows, columns)
    qtype: Any  # gguf.GGMLQuantizationType
    permute_heads: int | None  # Q/K: heads for the RoPE permutation
    header: dict | None = None  # the source's safetensors header entry (dtype, shape, data_offsets)

    @property
    def nbytes(self) -> int:
        import gguf

        block, size = gguf.GGML_QUANT_SIZES[self.qtype]
        return math.prod(self.shape) // block * size


def _plan(model_dir: Path, hp: _Hparams, outtype: str) -> tuple[list[_Tensor], list[str], bool, int]:
    """Every tensor to write, in order; the tensors that fell back to F16; whether output is tied; n_vocab."""
    import gguf

    shards = sorted(model_dir.glob("*.safetensors"))
    if not shards:
        raise UserError(f"{model_dir}: no *.safetensors weights")
    wanted = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
              "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}[outtype]
    # Q/K (weights and biases) are permuted for RoPE: their GGUF names without the suffix → heads
    permuted = {gguf.TENSOR_NAMES[kind].format(bid=layer): heads for layer in range(hp.n_layers)
                for kind, heads in ((gguf.MODEL_TENSOR.ATTN_Q, hp.n_head), (gguf.MODEL_TENSOR.ATTN_K, hp.n_head_kv))}

    sources: dict[str, tuple[Path, list[int], dict]] = {}
    for shard in shards:
        for hf_name, info in check_safetensors(shard).items():
            if hf_name in sources:
                raise UserError(f"{shard}: tensor {hf_name} is also in {sources[hf_name][0].name}")
            sources[hf_name] = (shard, list(info["shape"]), info)
    for required in ("model.embed_tokens.weight", "model.norm.weight"):
        if required not in sources:
            raise UserError(f"{model_dir}: the weights have no {required}")
    has_head = "lm_head.weight" in sources
    if not hp.tied and not has_head:
        raise UserError(f"{model_dir / 'config.json'}: tie_word_embeddings is false but the weights have no lm_head.weight")

    plan: list[_Tensor] = []
    fallbacks: list[str] = []
    if hp.rope is not None:
        name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
        plan.append(_Tensor(None, None, name, (hp.head_dim // 2,), gguf.GGMLQuantizationType.F32, None))
    for hf_name, (shard, shape, info) in sources.items():
        if hp.tied and hf_name == "lm_head.weight":
            continue  # tied: llama.cpp reuses token_embd; transformers ignores a stored copy as well
        name = hf_to_gguf_name(hf_name, hp.n_layers)
        if name is None and _computed_by_llama_cpp(hf_name, hp.n_layers):
            continue  # e.g. rotary_emb.inv_freq buffers: llama.cpp computes RoPE itself
        if name is None:
            raise UserError(f"{shard}: tensor {hf_name} has no place in a llama GGUF")
        if len(shape) == 1:
            qtype = gguf.GGMLQuantizationType.F32
        elif wanted == gguf.GGMLQuantizationType.Q8_0 and shape[-1] % 32 != 0:
            qtype = gguf.GGMLQuantizationType.F16
            fallbacks.append(name)
        else:
            qtype = wanted
        heads = permuted.get(name.rsplit(".", 1)[0])
        plan.append(_Tensor(hf_name, shard, name, tuple(shape), qtype, heads, info))
    # llama.cpp's order (its loader and quantizer use it too): file-wide tensors, then block by block
    plan.sort(key=lambda t: (int(t.name.split(".")[1]), t.name) if t.name.startswith("blk.") else (-1, t.name))
    n_vocab = sources["model.embed_tokens.weight"][1][0]
    return plan, fallbacks, hp.tied, n_vocab


def _rope_permute(weight: "torch.Tensor", heads: int) -> "torch.Tensor":
    """transformers' rotate-half layout (each head: all first halves, then all second halves) → llama.cpp's
    interleaved pairs, per head. Works on weights (rows = heads × head_dim) and biases alike."""
    rows = weight.shape[0]
    return (weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:])
            .transpose(1, 2)
            .reshape(weight.shape))


def _encode(tensor: "torch.Tensor", qtype: Any) -> np.ndarray:
    """A tensor in its source dtype → the bytes of `qtype`. F16 converts directly (a bfloat16 source never
    exists as float32 in full); Q8_0/BF16 go through float32 one row chunk at a time."""
    import gguf
    import torch

    if qtype == gguf.GGMLQuantizationType.F32:
        return tensor.to(torch.float32).contiguous().numpy()
    if qtype == gguf.GGMLQuantizationType.F16:
        return tensor.to(torch.float16).contiguous().numpy()
    rows = tensor.reshape(-1, tensor.shape[-1])
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    out = np.empty((rows.shape[0], rows.shape[1] // block * size), dtype=np.uint8)
    step = max(1, _QUANT_CHUNK_VALUES // rows.shape[1])
    for start in range(0, rows.shape[0], step):
        chunk = rows[start:start + step].to(torch.float32).contiguous().numpy()
        out[start:start + step] = gguf.quants.quantize(chunk, qtype)
    return out


def _source_tensor(item: _Tensor, tensor: "torch.Tensor | None", hp: _Hparams, adapter: "LoraAdapter | None") -> "torch.Tensor":
    """The tensor as llama.cpp wants it (adapter merged, Q/K permuted), still in its source dtype;
    `tensor` is the source tensor as read (None for tensors computed here)."""
    import torch

    if item.hf_name is None:
        return torch.from_numpy(llama3_rope_factors(hp.rope_theta, hp.head_dim, hp.rope or {}))
    if adapter is not None:
        tensor = adapter.merged(item.hf_name, tensor)
    if tuple(tensor.shape) != item.shape:
        raise UserError(f"{item.shard}: tensor {item.hf_name} has shape {tuple(tensor.shape)} after merging, "
                        f"expected {item.shape}")
    if item.permute_heads is not None:
        tensor = _rope_permute(tensor, item.permute_heads)
    return tensor


# --- convert --------------------------------------------------------------------------------------


def output_part(out_file: Path, needed: int) -> Path:
    """The `<out_file>.part` path a GGUF is written through, once the folder is known to exist, to be writable
    and to have `needed` bytes free (each a UserError naming the folder)."""
    out_dir = out_file.parent
    if not out_dir.is_dir():
        raise UserError(f"{out_dir}: output folder does not exist")
    part = out_file.with_name(out_file.name + ".part")
    try:  # fail fast, and plainly, on a folder we cannot write
        part.open("wb").close()
        part.unlink()
    except OSError as exc:
        raise UserError(f"{out_dir}: cannot write {part.name} there ({exc.strerror or exc})") from None
    free = shutil.disk_usage(out_dir).free
    if free < needed:
        raise UserError(f"{out_dir}: not enough free disk for {out_file.name}: needs about {needed / 2**20:.0f} MiB, "
                        f"{free / 2**20:.0f} MiB free")
    return part


@contextlib.contextmanager
def atomic_writer(part: Path, out_file: Path) -> Iterator[Any]:
    """A llama-architecture `gguf.GGUFWriter` on `part`. When the block ends, the file is flushed, synced, closed
    and renamed to `out_file`; when it fails, it is closed and removed (a full disk becomes a UserError)."""
    import gguf

    writer = gguf.GGUFWriter(part, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    try:
        yield writer
        writer.flush()
        assert writer.fout is not None
        for handle in writer.fout:
            os.fsync(handle.fileno())
        writer.close()
        os.replace(part, out_file)
    except BaseException as exc:
        writer.close()
        part.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise UserError(f"{out_file.parent}: disk full while writing {out_file.name} ({exc.strerror})") from None
        raise


def convert(model_dir: Path, out_file: Path, outtype: str = "f16", *, template: str, name: str | None = None,
            adapter: "LoraAdapter | None" = None) -> dict:
    """Write ``out_file`` (atomically: to out_file + '.part' then os.replace); return facts:
    {"outtype", "tensors", "bytes", "pre_tokenizer", "vocab_size", "bos_id", "eos_id", "eot_id", "stop_ids",
    "add_bos", "rope_freqs": bool, "tied": bool, "unk_id", "pad_id", "f16_fallback": [GGUF names]}"""
    import gguf

    model_dir, out_file = Path(model_dir), Path(out_file)
    if outtype not in SUPPORTED_OUTTYPES:
        raise UserError(f"GGUF outtype {outtype!r} is not supported; choose one of {', '.join(SUPPORTED_OUTTYPES)}")
    try:
        fmt = templates.get(template)
    except KeyError as exc:
        raise UserError(str(exc.args[0])) from None
    config_path = model_dir / "config.json"
    config = read_config(model_dir)  # UserError naming config.json for anything but LlamaForCausalLM
    hp = _hparams(config, config_path)
    if not (model_dir / "tokenizer.json").is_file():
        raise UserError(f"{model_dir / 'tokenizer.json'}: missing — the GGUF writer needs the fast tokenizer's "
                        "tokenizer.json (save the tokenizer with transformers to create it)")
    plan, fallbacks, tied, n_vocab = _plan(model_dir, hp, outtype)
    if adapter is not None:  # an adapter for another base fails here, before a byte is written
        shapes = {t.hf_name: t.shape for t in plan if t.hf_name}
        adapter.check_covers(set(shapes))
        adapter.check_shapes(shapes)

    payload = sum(gguf.GGUFWriter.ggml_pad(t.nbytes, gguf.GGUF_DEFAULT_ALIGNMENT) for t in plan)
    needed = payload + 2 * (model_dir / "tokenizer.json").stat().st_size + (1 << 20)  # + tokenizer metadata, header
    part = output_part(out_file, needed)

    vocab = _read_vocab(model_dir, n_vocab, config)
    needed_tokens = (fmt.eos_token, fmt.bos_token) if fmt.bos_token else (fmt.eos_token,)
    missing = [token for token in needed_tokens if token not in vocab.ids]
    if missing:
        raise UserError(f"{model_dir / 'tokenizer.json'}: chat format {template!r} needs {', '.join(missing)}, "
                        "which the tokenizer does not have")
    eos_id = vocab.ids[fmt.eos_token]
    stop_ids = [vocab.ids[token] for token in fmt.end_tokens if token in vocab.ids]  # llama.cpp's end-of-generation set
    add_bos = fmt.bos_token is not None
    bos_id = vocab.bos_id
    if add_bos and bos_id != vocab.ids[fmt.bos_token]:  # type: ignore[index]
        raise UserError(f"{model_dir}: the tokenizer's BOS (id {bos_id}) is not {fmt.bos_token}, which chat format "
                        f"{template!r} starts with")
    unk_id, pad_id, pre = vocab.unk_id, vocab.pad_id, vocab.pre
    if pad_id in stop_ids:  # a pad that ends generation (SmolLM2's <|im_end|>) is no pad; see _special_id
        pad_id = None

    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype]
    with atomic_writer(part, out_file) as writer:
        writer.add_name(name or model_dir.name)
        writer.add_context_length(hp.context)
        writer.add_embedding_length(hp.hidden)
        writer.add_block_count(hp.n_layers)
        writer.add_feed_forward_length(hp.ff)
        writer.add_head_count(hp.n_head)
        writer.add_head_count_kv(hp.n_head_kv)
        writer.add_key_length(hp.head_dim)  # as llama.cpp's converter: always (transformers' LlamaConfig has head_dim)
        writer.add_value_length(hp.head_dim)
        writer.add_rope_dimension_count(hp.head_dim)
        writer.add_rope_freq_base(hp.rope_theta)
        writer.add_layer_norm_rms_eps(hp.rms_eps)
        writer.add_vocab_size(n_vocab)
        writer.add_file_type(int(file_type))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(vocab.pre)
        writer.add_token_list(vocab.tokens)
        writer.add_token_types(vocab.types)
        writer.add_token_merges(vocab.merges)
        if bos_id is not None:
            writer.add_bos_token_id(bos_id)
        writer.add_eos_token_id(eos_id)
        writer.add_eot_token_id(eos_id)
        if unk_id is not None:
            writer.add_unk_token_id(unk_id)
        if pad_id is not None:
            writer.add_pad_token_id(pad_id)
        writer.add_add_bos_token(add_bos)
        writer.add_add_eos_token(False)
        writer.add_chat_template(fmt.inference)
        del vocab  # the writer holds what it needs; drop the parsed tokenizer before the weights stream

        for item in plan:
            dtype = {gguf.GGMLQuantizationType.F32: np.float32, gguf.GGMLQuantizationType.F16: np.float16}.get(item.qtype)
            writer.add_tensor_info(item.name, item.shape, np.dtype(dtype or np.float32), item.nbytes,
                                   raw_dtype=None if dtype else item.qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        _write_tensors(writer, plan, hp, adapter)
    return {
        "outtype": outtype,
        "tensors": len(plan),
        "bytes": out_file.stat().st_size,
        "pre_tokenizer": pre,
        "vocab_size": n_vocab,
        "bos_id": bos_id,
        "eos_id": eos_id,
        "eot_id": eos_id,
        "stop_ids": stop_ids,
        "add_bos": add_bos,
        "unk_id": unk_id,
        "pad_id": pad_id,
        "rope_freqs": hp.rope is not None,
        "tied": tied,
        "f16_fallback": fallbacks,
    }


class _RowChunks:
    """A tensor copied from its shard in chunks of rows, encoded chunk by chunk: what GGUFWriter's
    write_tensor_data needs (``nbytes``, ``tofile``) without the tensor ever being whole in memory."""

    def __init__(self, item: _Tensor, handle: Any, data_start: int):
        self.item, self.handle, self.data_start = item, handle, data_start
        self.nbytes = item.nbytes

    def tofile(self, fout: Any) -> None:
        from edgezh.export.tensor_stream import row_chunks

        where = f"{self.item.shard}: tensor {self.item.hf_name}"
        for chunk in row_chunks(self.handle, self.data_start, self.item.header, where):
            _encode(chunk, self.item.qtype).tofile(fout)


def _write_tensors(writer: Any, plan: list[_Tensor], hp: _Hparams, adapter: "LoraAdapter | None") -> None:
    """Tensors in plan order. Plain positioned reads, not memory maps (mapped pages stay resident and
    grow RSS to the model's size); Q/K (permuted) and adapted tensors are read whole, every other
    tensor in chunks of rows, so memory holds at most one attention matrix, never an embedding."""
    from edgezh.export.tensor_stream import read_tensor
    from edgezh.progress import track

    adapted = adapter.targets() if adapter is not None else set()
    handles: dict[Path, tuple[Any, int]] = {}
    try:
        for item in track(plan, "writing GGUF tensors"):
            if item.shard is None:
                writer.write_tensor_data(_encode(_source_tensor(item, None, hp, adapter), item.qtype))
                continue
            if item.shard not in handles:
                f = open(item.shard, "rb", buffering=0)
                handles[item.shard] = (f, 8 + int.from_bytes(f.read(8), "little"))
            handle, data_start = handles[item.shard]
            if item.permute_heads is None and item.hf_name not in adapted:
                writer.write_tensor_data(_RowChunks(item, handle, data_start))
                continue
            tensor = read_tensor(handle, data_start, item.header, f"{item.shard}: tensor {item.hf_name}")
            data = _encode(_source_tensor(item, tensor, hp, adapter), item.qtype)
            writer.write_tensor_data(data)
            del data, tensor
    finally:
        for f, _ in handles.values():
            f.close()