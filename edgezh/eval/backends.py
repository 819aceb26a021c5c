"""One interface to score token ids with transformers or llama.cpp.

A backend takes token ids (tokenized once by `edgezh.eval.tokens`; nothing is added or removed
here) and returns, for the positions asked for, the log-probabilities of the next token over the
whole vocabulary (float32, `[len(rows), n_vocab]`). Row `r` is the distribution after reading
`ids[: r + 1]`. Both backends also continue a prompt greedily.

- `HFBackend`: a transformers model in float32 (on CUDA when there is one) — an HF folder, that
  folder plus a peft LoRA adapter, or a GPTQ checkpoint (GPTQModel kernels, its own dtype). Only the
  rows asked for go through the output head (`logits_to_keep`).
- `GGUFBackend`: llama.cpp through llama-cpp-python's C API. For parity with transformers the KV
  cache is F32 (`type_k`/`type_v`; llama.cpp's default is F16) and flash attention is off; only the
  rows asked for are marked as outputs in the batch. `kv="f16"` gives llama.cpp's default settings
  (used for speed figures). `adapters`: LoRA adapter GGUFs llama.cpp applies on the base, with scales.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

from edgezh.errors import UserError


class Backend(Protocol):
    name: str
    n_vocab: int
    seconds: float  # time spent in log_probs
    tokens: int  # tokens read by log_probs

    def log_probs(self, ids: Sequence[int], rows: Sequence[int] | None = None): ...

    def greedy(self, ids: Sequence[int], max_new_tokens: int, stop_ids: Sequence[int]) -> list[int]: ...

    def close(self) -> None: ...


def _log_softmax(logits):
    import torch

    return torch.log_softmax(torch.as_tensor(logits, dtype=torch.float32), dim=-1)


def _rows(ids: Sequence[int], rows: Sequence[int] | None) -> list[int]:
    if not ids:
        raise ValueError("no token ids to score")
    if rows is None:
        return list(range(len(ids)))
    rows = list(rows)
    if any(r < 0 or r >= len(ids) for r in rows) or rows != sorted(set(rows)):
        raise ValueError(f"rows must be increasing positions inside the {len(ids)} ids")
    return rows


class HFBackend:
    """A transformers causal LM (optionally with a LoRA adapter) as a scoring backend."""

    def __init__(self, model, name: str, device: str):
        self.model, self.name, self.device = model, name, device
        self.n_vocab = int(model.get_output_embeddings().weight.shape[0])
        self.seconds, self.tokens = 0.0, 0

    @classmethod
    def load(cls, folder: Path, *, name: str = "hf", adapter: Path | None = None, gptq: bool = False) -> "HFBackend":
        import torch
        from transformers import AutoModelForCausalLM

        device = "cuda" if torch.cuda.is_available() else "cpu"
        if gptq:
            try:
                import gptqmodel  # noqa: F401  (registers the GPTQ kernels with transformers)
            except ImportError:
                raise UserError("evaluating the GPTQ checkpoint needs GPTQModel: pip install 'edgezh[gptq]' -c constraints.txt") from None
            model = AutoModelForCausalLM.from_pretrained(folder, device_map=device)
        else:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device)
        if adapter is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, adapter)
        model.eval()
        return cls(model, name, device)

    def log_probs(self, ids: Sequence[int], rows: Sequence[int] | None = None):
        import torch

        rows = _rows(ids, rows)
        started = time.perf_counter()
        with torch.inference_mode():
            x = torch.tensor([list(ids)], device=self.device)
            keep = torch.tensor(rows, device=self.device)
            logits = self.model(input_ids=x, logits_to_keep=keep, use_cache=False).logits[0]
            out = _log_softmax(logits.float().cpu())
        self.seconds += time.perf_counter() - started
        self.tokens += len(ids)
        return out

    def greedy(self, ids: Sequence[int], max_new_tokens: int, stop_ids: Sequence[int]) -> list[int]:
        import torch

        with torch.inference_mode():
            x = torch.tensor([list(ids)], device=self.device)
            out = self.model.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=False,
                                      max_new_tokens=max_new_tokens, eos_token_id=list(stop_ids),
                                      pad_token_id=stop_ids[0], temperature=None, top_p=None, top_k=None)
        new = out[0, len(ids):].tolist()
        return _cut_at_stop(new, stop_ids)

    def close(self) -> None:
        import gc

        self.model = None
        gc.collect()

    def __enter__(self) -> "HFBackend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _cut_at_stop(ids: list[int], stop_ids: Sequence[int]) -> list[int]:
    for i, token in enumerate(ids):
        if token in stop_ids:
            return ids[:i]
    return ids


class GGUFBackend:
    """A GGUF file in llama.cpp as a scoring backend (one sequence, cleared before every call)."""

    def __init__(self, path: Path, *, n_ctx: int, name: str = "gguf", kv: str = "f32", threads: int | None = None,
                 n_batch: int = 512, adapters: Sequence[tuple[Path, float]] = ()):
        import llama_cpp

        if not Path(path).is_file():
            raise UserError(f"{path}: no such GGUF file")
        kv_type = {"f32": llama_cpp.GGML_TYPE_F32, "f16": llama_cpp.GGML_TYPE_F16}[kv]
        self.name, self.path, self.n_ctx = name, Path(path), n_ctx
        self.n_batch = min(n_batch, n_ctx)
        self.llm = llama_cpp.Llama(str(path), n_ctx=n_ctx, n_batch=self.n_batch, n_ubatch=self.n_batch, n_threads=threads,
                                   n_threads_batch=threads, logits_all=False, type_k=kv_type, type_v=kv_type,
                                   flash_attn=False, n_gpu_layers=-1 if llama_cpp.llama_supports_gpu_offload() else 0,
                                   verbose=False)
        if adapters:  # LoRA adapter GGUFs on the base, each with its scale (edgezh.export.lora_gguf)
            from edgezh.export.lora_gguf import attach

            try:
                attach(self.llm, adapters)
            except BaseException:
                self.llm.close()
                raise
        self.n_vocab = int(self.llm.n_vocab())
        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self.seconds, self.tokens = 0.0, 0

    def _clear(self) -> None:
        import llama_cpp

        memory = llama_cpp.llama_get_memory(self.llm.ctx)
        if memory is not None:
            llama_cpp.llama_memory_clear(memory, True)

    def _decode(self, ids: Sequence[int], start: int, rows: set[int]) -> list[np.ndarray]:
        """Feed `ids` at positions `start…`; return the logits of the positions (relative to `ids`) in `rows`."""
        import llama_cpp

        if start + len(ids) > self.n_ctx:
            raise UserError(f"{self.path.name}: {start + len(ids)} tokens do not fit llama.cpp's context of {self.n_ctx}")
        out = []
        batch = self._batch
        for first in range(0, len(ids), self.n_batch):
            chunk = ids[first:first + self.n_batch]
            wanted = 0
            for i, token in enumerate(chunk):
                j = first + i
                batch.token[i] = token
                batch.pos[i] = start + j
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = j in rows
                wanted += j in rows
            batch.n_tokens = len(chunk)
            code = llama_cpp.llama_decode(self.llm.ctx, batch)
            if code != 0:
                raise RuntimeError(f"llama_decode returned {code} for {self.path.name}")
            if wanted:
                logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits(self.llm.ctx), shape=(wanted * self.n_vocab,))
                out.extend(logits.reshape(wanted, self.n_vocab).copy())
        return out

    def log_probs(self, ids: Sequence[int], rows: Sequence[int] | None = None):
        rows = _rows(ids, rows)
        started = time.perf_counter()
        self._clear()
        logits = self._decode(list(ids), 0, set(rows))
        out = _log_softmax(np.stack(logits))
        self.seconds += time.perf_counter() - started
        self.tokens += len(ids)
        return out

    def greedy(self, ids: Sequence[int], max_new_tokens: int, stop_ids: Sequence[int]) -> list[int]:
        self._clear()
        ids = list(ids)
        (logits,) = self._decode(ids, 0, {len(ids) - 1})
        new: list[int] = []
        while len(new) < max_new_tokens:
            token = int(np.argmax(logits))
            if token in stop_ids:
                break
            new.append(token)
            if len(new) == max_new_tokens:
                break
            (logits,) = self._decode([token], len(ids) + len(new) - 1, {0})
        return new

    def close(self) -> None:
        import llama_cpp

        if getattr(self, "_batch", None) is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None
        if getattr(self, "llm", None) is not None:
            self.llm.close()
            self.llm = None

    def __enter__(self) -> "GGUFBackend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
