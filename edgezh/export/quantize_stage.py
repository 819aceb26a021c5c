"""Stage `quantize`: llama.cpp quantizes the converted GGUF into each requested type.

With `export.gguf.imatrix` every type is quantized with the build's importance matrix (and the
types listed in `plain` once more without it, as `<type>-plain`, for the report to compare); the
per-tensor settings (`output_type`, `token_embedding_type`, `pure`, `tensor_types`) apply to every
type. `export.gguf.fit` adds the mix it chose for the size budget as kind `fit`.
"""

from __future__ import annotations

from pathlib import Path

from edgezh import layout
from edgezh.artifacts import Artifact
from edgezh.export.quantize import quantize
from edgezh.progress import status
from edgezh.recipe import GGUFConfig

VERSION = "2"  # 2: importance matrix, per-tensor types, plain twins, fit


def imatrix_args(inputs: dict[str, Artifact]) -> dict:
    """`quantize`'s imatrix arguments from the imatrix artifact (empty without one), as llama-quantize
    --imatrix FILE reads them; the GGUF records the file's name, not this machine's path."""
    if "imatrix" not in inputs:
        return {}
    from edgezh.export.imatrix import quantize_args

    artifact = inputs["imatrix"]
    args = quantize_args(artifact.file(artifact.info["file"]))
    args["imatrix_meta"]["file"] = artifact.info["file"]
    return args


def tensor_settings(cfg: GGUFConfig) -> dict:
    """The per-tensor arguments of `quantize` the recipe gives."""
    return {"tensor_types": [(rule.pattern, rule.type) for rule in cfg.tensor_types] or None,
            "output_type": cfg.output_type, "token_embedding_type": cfg.token_embedding_type, "pure": cfg.pure}


def run(cfg: GGUFConfig, inputs: dict[str, Artifact], out: Path) -> dict:
    name = layout.build_name(out)
    source = inputs["gguf"].file(inputs["gguf"].info["file"])
    matrix = imatrix_args(inputs)
    settings = tensor_settings(cfg)
    jobs = [(qtype, qtype, matrix) for qtype in cfg.quantize] + [(layout.plain_kind(q), q, {}) for q in cfg.plain]
    results = {}
    for kind, qtype, with_matrix in jobs:
        file = layout.gguf_name(name, kind)
        note = " with the importance matrix" if with_matrix else ""
        with status(f"llama.cpp quantize → {file}{note}"):
            results[kind] = {**quantize(source, out / file, qtype, **with_matrix, **settings), "imatrix": bool(with_matrix)}
    info: dict = {"quants": results}
    if cfg.fit is not None:
        from edgezh.export import fit

        chosen, report = fit.choose(cfg, source, inputs, out, matrix, name)
        info["fit"] = report
        if chosen is not None:
            results[layout.FIT_KIND] = chosen
    info["exports"] = [r["file"] for kind, r in results.items() if not layout.is_plain_twin(kind)]
    return info
