"""Submodel -> ONNX -> ONNX Runtime training artifacts, and the manifest that describes them.

Artifacts depend only on the architecture (model config + spec + exporter settings), so each submodel's
folder is named by a hash of those and reused until it changes; a round only moves weights.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from nefl_edge.core.artifacts import MANIFEST_NAME, ArtifactError, file_entry, load_manifest
from nefl_edge.core.schemas import (
    DISTILL_ROLES,
    SUBMODEL_ROLES,
    ArtifactRole,
    FileEntry,
    InputNormalization,
    Manifest,
    ParamEntry,
    SubmodelEntry,
    TrainConfig,
)
from nefl_edge.core.specs import ModelConfig, SubmodelSpec, mflops, param_count, param_layout
from nefl_edge.export.distill import DISTILL_VERSION, export_distill
from nefl_edge.export.portable import build_portable_step
from nefl_edge.export.stats import build_stats_graph
from nefl_edge.export.training_graph import OPSET, forward_model, quiet, rewrite_training_graph

EXPORT_VERSION = 7  # 7: portable BatchNorm backward in fewer passes, strided dW by one-hot Conv im2col


def architecture_key(config: ModelConfig, spec: SubmodelSpec) -> str:
    blob = {
        "config": config.to_dict(),
        "width": spec.width,
        "blocks": [list(b) for b in spec.blocks],
        "export": EXPORT_VERSION,
        "opset": OPSET,
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


def _export_one(config: ModelConfig, spec: SubmodelSpec, folder: Path) -> None:
    from nefl_edge.edge_client.trainer import training_api

    training_api()
    from onnxruntime.training import artifacts

    model, requires_grad, frozen = forward_model(config, spec, folder / "forward.onnx")
    with quiet():
        artifacts.generate_artifacts(
            model,
            requires_grad=requires_grad,
            frozen_params=frozen,
            loss=artifacts.LossType.CrossEntropyLoss,
            optimizer=artifacts.OptimType.SGD,
            artifact_directory=str(folder),
            additional_output_names=["logits"],
        )
    training, evaluation = folder / ArtifactRole.TRAINING.file_name, folder / ArtifactRole.EVAL.file_name
    _fix_eval_batchnorm(evaluation)
    build_stats_graph(evaluation, folder / ArtifactRole.STATS.file_name)
    rewrite_training_graph(training)
    (folder / "optimizer_model.onnx").unlink()  # the device applies SGD itself (numpy or the portable graph)
    build_portable_step(training, folder / ArtifactRole.PORTABLE.file_name, requires_grad, frozen, config.num_classes)


def _fix_eval_batchnorm(path: Path) -> None:
    """ORT refuses eval graphs whose BatchNormalization (training_mode=0) nodes keep three outputs."""
    import onnx

    model = onnx.load(str(path))
    for node in model.graph.node:
        if node.op_type == "BatchNormalization" and len(node.output) > 1:
            mode = next((a.i for a in node.attribute if a.name == "training_mode"), 0)
            if mode == 0:
                del node.output[1:]
    onnx.save(model, str(path))


def distill_key(config: ModelConfig, big: SubmodelSpec, small: SubmodelSpec) -> str:
    """Names the distillation files of submodel ``big`` (``export.distill``): both architectures."""
    blob = {"big": architecture_key(config, big), "small": architecture_key(config, small), "distill": DISTILL_VERSION}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


def _submodel_entry(
    config: ModelConfig, spec: SubmodelSpec, index: int, key: str, folder: Path, distill: Path | None = None
) -> SubmodelEntry:
    layout = param_layout(config, spec)
    files = {role: file_entry(folder / role.file_name, f"{folder.name}/{role.file_name}") for role in SUBMODEL_ROLES}
    if distill is not None:
        files.update(
            {role: file_entry(distill / role.file_name, f"{distill.name}/{role.file_name}") for role in DISTILL_ROLES}
        )
    return SubmodelEntry(
        index=index,
        key=key,
        width=spec.width,
        blocks=[list(b) for b in spec.blocks],
        gamma=spec.gamma,
        mflops=round(mflops(config, spec), 4),
        param_count=param_count(config, spec),
        files=files,
        params=[ParamEntry(name=n, shape=p.shape, kind=p.kind, trainable=p.trainable) for n, p in layout.items()],
    )


def export_set(
    config: ModelConfig,
    specs: list[SubmodelSpec],
    out: Path,
    train: TrainConfig | None = None,
    log: Callable[[str], None] | None = None,
    distill: bool = False,
) -> Manifest:
    """Write (or reuse) the artifacts of every submodel under ``out`` and the manifest for the set. With
    ``distill`` (``Plan.distill_smallest``), every submodel above 0 also gets the files of its in-place
    distillation step into submodel 0 (``export.distill``), in a folder named by ``distill_key``."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not (out / MANIFEST_NAME).is_file():
        raise ArtifactError(f"{out} exists and is not an artifact folder (no {MANIFEST_NAME}); choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    previous = _previous_entries(out)
    entries = []
    for index, spec in enumerate(specs):
        key = architecture_key(config, spec)
        folder = out / f"sub-{key[:16]}"
        old = previous.get(key)
        if old is None or not _intact(out, list(old.files.values())):
            if folder.exists():
                shutil.rmtree(folder)
            tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=out))
            _export_one(config, spec, tmp)
            tmp.rename(folder)
            if log is not None:
                log(f"exported submodel {index} (gamma {spec.gamma:.2f}) -> {folder.name}")
        elif log is not None:
            log(f"reused submodel {index} (gamma {spec.gamma:.2f}) from cache {folder.name}")
        distilled = _distill_folder(config, specs, index, folder, out, old, log) if distill and index else None
        entries.append(_submodel_entry(config, spec, index, key, folder, distilled))
    manifest = Manifest(
        model=config.to_dict(),
        input_shape=(config.in_channels, config.image_size, config.image_size),
        num_classes=config.num_classes,
        train=train or TrainConfig(),
        opset=OPSET,
        submodels=entries,
        normalize=InputNormalization(mean=list(config.input_mean), std=list(config.input_std))
        if config.input_mean
        else None,
    )
    (out / MANIFEST_NAME).write_text(manifest.to_json())
    return manifest


def _distill_folder(
    config: ModelConfig,
    specs: list[SubmodelSpec],
    index: int,
    folder: Path,
    out: Path,
    old: SubmodelEntry | None,
    log: Callable[[str], None] | None,
) -> Path:
    """The folder of submodel ``index``'s distillation files, written unless an intact one is listed in ``old``."""
    key = distill_key(config, specs[index], specs[0])
    target = out / f"distill-{key[:16]}"
    listed = [f for r, f in old.files.items() if r in DISTILL_ROLES] if old is not None else []
    named = len(listed) == len(DISTILL_ROLES) and all(f.name.startswith(target.name + "/") for f in listed)
    if named and _intact(out, listed):
        return target
    if target.exists():
        shutil.rmtree(target)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=out))
    export_distill(config, specs[index], specs[0], folder / ArtifactRole.TRAINING.file_name, tmp)
    tmp.rename(target)
    if log is not None:
        log(f"exported the distillation step of submodel {index} into submodel 0 -> {target.name}")
    return target


def _previous_entries(out: Path) -> dict[str, SubmodelEntry]:
    try:
        return {s.key: s for s in load_manifest(out, verify=False).submodels}
    except ArtifactError:
        return {}


def _intact(out: Path, files: list[FileEntry]) -> bool:
    try:
        return all(file_entry(out / f.name, f.name) == f for f in files)
    except OSError:
        return False
