"""`edgezh merge | convert | quantize | modelfile`: the export stages as standalone commands."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from edgezh import layout, templates
from edgezh.artifacts import canonical_hash, commit, fresh_tmp, hash_outputs, read_manifest
from edgezh.errors import UserError
from edgezh.progress import out, status
from edgezh.recipe import ModelfileConfig


def _existing(path: str, what: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise UserError(f"{p}: no such {what}")
    return p


def _chosen_template(given: str | None, own_template: str | None, where: Path) -> str:
    """The chat format: the one given on the command line, else detected from the model's own template."""
    name = given or templates.detect(own_template if isinstance(own_template, str) else None)
    if name is None:
        raise UserError(f"{where}: cannot tell its chat format; pass --template ({', '.join(templates.names())})")
    if name not in templates.names():
        raise UserError(f"--template {name}: unknown chat format (known: {', '.join(templates.names())})")
    return name


def _folder_template(folder: Path, given: str | None) -> str:
    """The chat format of an HF folder, from its chat_template.jinja or tokenizer_config.json."""
    text = None
    if not given and (folder / "chat_template.jinja").is_file():
        text = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    elif not given and (folder / "tokenizer_config.json").is_file():
        text = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8")).get("chat_template")
    return _chosen_template(given, text, folder)


def _gguf_template(path: Path, given: str | None) -> str:
    """The chat format of a GGUF, from its embedded tokenizer.chat_template."""
    from edgezh.gguf_meta import read_metadata

    text = None if given else read_metadata(path, ["tokenizer.chat_template"]).get("tokenizer.chat_template")
    return _chosen_template(given, text, path)


def merge_cmd(args) -> int:
    from edgezh.export.merge import merge
    from edgezh.layout import fingerprint_folder

    base, adapter, dest = _existing(args.base, "base model folder"), _existing(args.adapter, "adapter folder"), Path(args.output)
    adapter_files, _ = hash_outputs(adapter)
    key = canonical_hash({"base": fingerprint_folder(base), "adapter": adapter_files, "dtype": args.dtype})
    manifest = read_manifest(dest)
    if manifest is not None and manifest.get("key") == key:
        out.print(f"already merged: {dest} (same base, adapter and dtype)")
        return 0
    if dest.exists() and manifest is None:
        raise UserError(f"{dest}: exists and is not an edgezh merge output; choose another -o")
    tmp = fresh_tmp(dest)
    try:
        with status(f"merging {adapter.name} into {base.name}"):
            info = merge(base, adapter, tmp, dtype=args.dtype)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    commit(tmp, dest, {"stage": "merge", "key": key, "info": info})
    out.print(f"merged {info.get('tensors_changed', '?')} tensors → {dest}")
    return 0


def convert_cmd(args) -> int:
    from edgezh.export.gguf_writer import convert

    if getattr(args, "lora", None):
        return _convert_lora(args)
    folder = _existing(args.model, "model folder")
    template = _folder_template(folder, args.template)
    dest = Path(args.output or f"{folder.resolve().name}-{args.outtype}.gguf")
    adapter = None
    if args.adapter:
        from edgezh.export.lora import LoraAdapter

        adapter = LoraAdapter.load(_existing(args.adapter, "adapter folder"))
    with status(f"writing {dest} ({args.outtype}, chat format {template})"):
        facts = convert(folder, dest, args.outtype, template=template, adapter=adapter)
    out.print(f"{dest}: {facts.get('tensors')} tensors, {dest.stat().st_size / 2**20:.1f} MiB, pre-tokenizer {facts.get('pre_tokenizer')}")
    return 0


def _convert_lora(args) -> int:
    """`edgezh convert BASE --lora ADAPTER_DIR`: the peft adapter as a GGUF LoRA adapter, checked against BASE."""
    from edgezh.export.lora_gguf import OUTTYPES, convert

    if args.adapter:
        raise UserError("--adapter merges an adapter into the model's GGUF, --lora writes it as a GGUF of its own: give one")
    if args.outtype not in OUTTYPES:
        raise UserError(f"--outtype {args.outtype}: an adapter GGUF is {', '.join(OUTTYPES)}")
    base = _existing(args.model, "base model folder")
    adapter = _existing(args.lora, "adapter folder")
    dest = Path(args.output or f"{adapter.resolve().name}-lora-{args.outtype}.gguf")
    with status(f"writing {dest} (LoRA adapter, {args.outtype})"):
        facts = convert(base, adapter, dest, args.outtype)
    out.print(f"{dest}: {facts['pairs']} LoRA pairs (rank {', '.join(map(str, facts['ranks']))}, alpha {facts['alpha']:g}), "
              f"{facts['bytes'] / 2**20:.1f} MiB")
    out.print(f"  on its base in llama.cpp: edgezh convert {base} -o base.gguf, then llama-server -m base.gguf --lora {dest}")
    return 0


def _tensor_rules(values: list[str]) -> list[tuple[str, str]]:
    import re

    rules = []
    for value in values:
        pattern, sep, kind = value.rpartition("=")
        if not sep or not pattern or not kind:
            raise UserError(f"--tensor-type {value}: write REGEX=TYPE, e.g. ffn_down=q6_k")
        try:
            re.compile(pattern)
        except re.error as exc:
            raise UserError(f"--tensor-type {value}: {pattern!r} is not a regular expression ({exc})") from None
        rules.append((pattern, kind.lower()))
    return rules


def quantize_cmd(args) -> int:
    from edgezh.export.quantize import dry_run_size, quantize

    source = _existing(args.gguf, "GGUF file")
    folder = Path(args.output_dir) if args.output_dir else source.parent
    stem = layout.quant_stem(source)
    settings = {"tensor_types": _tensor_rules(args.tensor_type) or None, "output_type": args.output_type,
                "token_embedding_type": args.token_embedding_type, "pure": args.pure}
    matrix = {}
    if args.imatrix:
        from edgezh.export.imatrix import quantize_args

        matrix = quantize_args(_existing(args.imatrix, "imatrix file"))
        matrix["imatrix_meta"]["file"] = Path(args.imatrix).name
    for qtype in args.types:
        dest = folder / layout.gguf_name(stem, qtype)
        if args.dry_run:
            facts = dry_run_size(source, qtype, **matrix, **settings)
            out.print(f"{dest.name}: would be {facts['bytes'] / 2**20:.1f} MiB, {facts['bits_per_weight']} bits/weight "
                      f"({', '.join(f'{k} ×{n}' for k, n in facts['tensor_types'].items())})")
            continue
        with status(f"llama.cpp quantize → {dest}" + (" with the importance matrix" if matrix else "")):
            facts = quantize(source, dest, qtype, **matrix, **settings)
        fell = f", {len(facts['fallback'])} tensor(s) fell back: " + ", ".join(
            f"{f['tensor']}→{f['type']}" for f in facts["fallback"][:4]) if facts["fallback"] else ""
        out.print(f"{dest}: {facts['bytes'] / 2**20:.1f} MiB, {facts['bits_per_weight']} bits/weight{fell}")
    return 0


def modelfile_cmd(args) -> int:
    from edgezh.export.modelfile import commands, render

    source = _existing(args.gguf, "GGUF file")
    template = _gguf_template(source, args.template)
    stem = source.name.removesuffix(".gguf")
    kind = layout.kind_of(source.name)
    cfg = ModelfileConfig(system=args.system, num_ctx=args.num_ctx)
    dest = source.parent / f"Modelfile.{kind}"
    dest.write_text(render(source.name, template, cfg, title=f"{stem} — written by edgezh"), encoding="utf-8")
    model = layout.ollama_tag(source.name, kind)
    out.print(f"wrote {dest}")
    for line in commands(source.parent, model, kind):
        out.print(f"  {line}")
    return 0
