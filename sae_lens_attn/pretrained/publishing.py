"""Publishing attention SAEs: a SAELens-native release folder, its model card, the upstream kit,
and optionally one commit to the Hugging Face Hub.

Layout of the published folder (the repository's contents, plus ``upstream/``)::

    README.md                      model card
    <sae_id>/cfg.json              one SAELens-native folder per SAE, named by its id
    <sae_id>/sae_weights.safetensors
    <sae_id>/sparsity.safetensors  log10 feature densities
    upstream/pretrained_saes.yaml  the release's entry for SAELens (also a releases file)
    upstream/test_<release>.py     its loader test for SAELens's test suite

The folder appears whole or not at all (``sae_lens_attn.outputs.atomic_output``); an earlier
release folder is only replaced with ``overwrite=True``, and a folder of other files never.
``upstream/`` and the output marker are never uploaded.
"""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import sae_lens
from jaxtyping import Int
from sae_lens import SAE
from sae_lens.constants import SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME, SPARSITY_FILENAME
from sae_lens.saes.sae import TrainingSAE
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from sae_lens_attn.config.metadata import attention_metadata, read_attention_metadata
from sae_lens_attn.outputs import atomic_output, check_output
from sae_lens_attn.pretrained import directory
from sae_lens_attn.pretrained.hub import push_to_hub
from sae_lens_attn.pretrained.metrics import SAEMetrics, measure
from sae_lens_attn.pretrained.model_card import (
    CardEntry,
    head_shares,
    render_model_card,
    with_training_metadata,
)
from sae_lens_attn.pretrained.releases import Release, ReleaseSAE
from sae_lens_attn.pretrained.upstream import (
    UPSTREAM_DIR,
    YAML_ENTRY_FILE,
    expected_loader_config,
    loader_test_name,
    loader_test_source,
    yaml_entry_text,
)
from sae_lens_attn.site import AttnSite

SAE_FILES = (SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME, SPARSITY_FILENAME)
"""Files of one published SAE folder (SAELens's native format)."""
OUTPUT_KIND = "release"
"""Kind of output folder ``publish`` writes (see ``sae_lens_attn.outputs``)."""
MODEL_CARD_FILE = "README.md"
"""The model card's file name (Hugging Face shows it as the repository's page)."""

DISTRIBUTION = "sae-lens-attn"
"""The distribution (PyPI) name whose installed version the model card and loader test name."""
UNKNOWN_VERSION = "0+unknown"
"""The version written where the package runs from a checkout that is not installed."""

_SAE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)*")


def package_version() -> str:
    """The installed version of sae-lens-attn, read from the distribution's metadata (so
    publishing needs no import of the package itself); ``UNKNOWN_VERSION`` in a checkout that
    was never installed."""
    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:
        return UNKNOWN_VERSION


@dataclass(frozen=True)
class PublishResult:
    """What ``publish`` wrote (and pushed)."""

    out_dir: Path
    """The published folder."""
    release: Release
    """The release as written to ``upstream/pretrained_saes.yaml``."""
    sae_dirs: Mapping[str, Path]
    """SAE id → its SAELens-native folder."""
    metrics: Mapping[str, SAEMetrics]
    """SAE id → the metrics on the model card."""
    model_card: Path
    """The ``README.md``."""
    yaml_entry: Path
    """The release's entry for SAELens's ``pretrained_saes.yaml``."""
    loader_test: Path
    """The release's loader test for SAELens's test suite."""
    commit: str | None
    """Id of the Hugging Face commit, if pushed."""


def publish(
    saes: Mapping[str, SAE[Any] | str | Path],
    out_dir: str | Path,
    *,
    release: str,
    repo_id: str,
    model: Any = None,
    tokens: Int[Tensor, " batch pos"] | None = None,
    metrics: Mapping[str, Mapping[str, float]] | None = None,
    model_name: str | None = None,
    exclude_tokens: Sequence[int] = (),
    links: Mapping[str, str] | None = None,
    overwrite: bool = False,
    push: bool = False,
    hf_api: Any = None,
    private: bool = False,
    progress: bool = True,
) -> PublishResult:
    """Publish attention SAEs as a release: SAELens-native folders, model card, upstream kit.

    The metrics are measured on ``tokens`` run through ``model``, or taken from ``metrics``;
    numbers that are neither are shown as not measured and left out of the YAML entry.

    Args:
        saes: SAE id → SAE, or folder saved by SAELens/sae_lens_attn (its ``sparsity.safetensors``
            is kept). Ids become folder names and the ids of the release.
        out_dir: the folder to write (the repository's contents).
        release: release name for SAELens's directory (no ``/``; not a SAELens release name).
        repo_id: Hugging Face repository, ``owner/name``.
        model: model to measure on (any model a backend supports), with ``tokens``.
        tokens: ``[batch, pos]`` token ids to measure on, with ``model``.
        metrics: SAE id → {``l0``, ``ce_loss_recovered``, ``dead_pct``, ``explained_variance``}
            given by the caller, instead of ``model`` and ``tokens``.
        model_name: model name for the YAML entry; defaults to the SAEs' ``metadata.model_name``.
        exclude_tokens: token ids left out of l0, explained variance and densities (BOS, EOS,
            padding), as SAELens's evals do.
        links: links for the YAML entry (``model``, ``publication``, ``dashboards``, ...).
        overwrite: replace ``out_dir`` if it exists and is not empty.
        push: upload to ``repo_id`` (create the repository, then one commit).
        hf_api: the ``huggingface_hub.HfApi`` to push with (default: a new one).
        private: create the repository as private.
        progress: show a progress bar while measuring.

    Returns:
        What was written, and the commit id if pushed.

    Raises:
        FileExistsError: ``out_dir`` may not be written (``sae_lens_attn.outputs.check_output``):
            it holds files publish did not write, or a release and ``overwrite`` is false.
        ValueError: invalid ids, names, metrics, or SAEs that are not attention SAEs on hook_z.
    """
    tool = f"sae-lens-attn {package_version()} (SAELens {sae_lens.__version__})"
    out_dir = Path(out_dir)
    _check_inputs(saes, release, model, tokens, metrics)
    check_output(out_dir, kind=OUTPUT_KIND, overwrite=overwrite)
    directory.check_not_saelens_release(release, "publish")
    given = dict(metrics or {})

    loaded = {sae_id: _load(ref, sae_id) for sae_id, ref in saes.items()}
    the_model_name = _model_name(loaded, model_name)
    entries, sparsities = _describe(loaded, model, tokens, given, exclude_tokens, progress)
    the_release = Release(
        name=release,
        repo_id=repo_id,
        model=the_model_name,
        saes=tuple(_release_sae(e) for e in entries),
        links=dict(links) if links else None,
    )
    with atomic_output(out_dir, kind=OUTPUT_KIND, overwrite=overwrite) as tmp:
        for entry in entries:
            sae = loaded[entry.sae_id][0]
            _write_sae(
                tmp / entry.sae_id, sae, entry.site, sparsities[entry.sae_id], the_model_name
            )
        _write_docs(tmp, the_release, entries, tool)

    commit = None
    if push:
        commit = push_to_hub(
            out_dir,
            repo_id,
            hf_api=hf_api,
            private=private,
            commit_message=f"Publish {release} ({tool})",
        )
    return PublishResult(
        out_dir=out_dir,
        release=the_release,
        sae_dirs={e.sae_id: out_dir / e.sae_id for e in entries},
        metrics={e.sae_id: e.metrics for e in entries},
        model_card=out_dir / MODEL_CARD_FILE,
        yaml_entry=out_dir / UPSTREAM_DIR / YAML_ENTRY_FILE,
        loader_test=out_dir / UPSTREAM_DIR / loader_test_name(the_release),
        commit=commit,
    )


def _describe(
    loaded: Mapping[str, tuple[SAE[Any], Tensor | None]],
    model: Any,
    tokens: Tensor | None,
    given: Mapping[str, Mapping[str, float]],
    exclude_tokens: Sequence[int],
    progress: bool,
) -> tuple[list[CardEntry], dict[str, Tensor]]:
    """Model-card entries and log feature densities of every SAE (measured when model is given)."""
    entries: list[CardEntry] = []
    sparsities: dict[str, Tensor] = {}
    bar = tqdm(loaded.items(), desc="measuring SAEs", disable=not progress or model is None)
    for sae_id, (sae, sparsity) in bar:
        site = _site_of(sae, model, sae_id)
        if model is not None and tokens is not None:
            measured = measure(model, sae, tokens, exclude_tokens=exclude_tokens)
            sae_metrics = measured.metrics
            sparsity = measured.log_sparsity if sparsity is None else sparsity
        else:
            sae_metrics = SAEMetrics.from_mapping(given.get(sae_id, {}), sae_id=sae_id)
            sae_metrics = with_training_metadata(sae_metrics, sae.cfg.metadata, sae.cfg.d_sae)
        if sparsity is None:
            raise ValueError(
                f"SAE {sae_id!r} has no feature densities for {SPARSITY_FILENAME}: pass a folder "
                "that has one, or model= and tokens= to measure them"
            )
        if tuple(sparsity.shape) != (sae.cfg.d_sae,):
            raise ValueError(
                f"SAE {sae_id!r}: sparsity has shape {tuple(sparsity.shape)}, expected "
                f"({sae.cfg.d_sae},)"
            )
        sparsities[sae_id] = sparsity
        entries.append(
            CardEntry(
                sae_id=sae_id,
                site=site,
                architecture=sae.cfg.architecture(),
                d_sae=sae.cfg.d_sae,
                convention=read_attention_metadata(sae.cfg.metadata).value_bias_convention,
                metrics=sae_metrics,
                head_shares=tuple(head_shares(sae.W_dec, site).tolist()),
            )
        )
    return entries, sparsities


def _release_sae(entry: CardEntry) -> ReleaseSAE:
    """The SAE's YAML item: folder = id; l0 and variance explained only when known."""
    l0, explained = entry.metrics.l0, entry.metrics.explained_variance
    return ReleaseSAE(
        id=entry.sae_id,
        path=entry.sae_id,
        l0=None if l0 is None else round(l0, 2),
        variance_explained=None if explained is None else round(explained, 4),
    )


def _write_docs(folder: Path, release: Release, entries: Sequence[CardEntry], tool: str) -> None:
    """README.md, and upstream/ with the YAML entry and the loader test (after the SAE folders)."""
    (folder / MODEL_CARD_FILE).write_text(
        render_model_card(release, entries, tool=tool), encoding="utf-8"
    )
    upstream = folder / UPSTREAM_DIR
    upstream.mkdir()
    (upstream / YAML_ENTRY_FILE).write_text(yaml_entry_text(release, tool=tool), encoding="utf-8")
    first = entries[0]
    expected = expected_loader_config(release, first.sae_id, folder / first.sae_id)
    (upstream / loader_test_name(release)).write_text(
        loader_test_source(release, first.sae_id, expected, first.site, tool=tool),
        encoding="utf-8",
    )


def _check_inputs(
    saes: Mapping[str, Any],
    release: str,
    model: Any,
    tokens: Tensor | None,
    metrics: Mapping[str, Mapping[str, float]] | None,
) -> None:
    if not saes:
        raise ValueError("publish needs at least one SAE, got none")
    for sae_id in saes:
        if (
            not isinstance(sae_id, str)
            or not _SAE_ID.fullmatch(sae_id)
            or sae_id.split("/")[0]
            in (
                UPSTREAM_DIR,
                MODEL_CARD_FILE,
            )
        ):
            raise ValueError(
                f"invalid SAE id {sae_id!r}: ids name folders, so use letters, digits, '.', '_', "
                f"'-' (and '/' between folders), not starting with '.', and not {UPSTREAM_DIR!r}"
            )
    same_folder: dict[str, str] = {}
    for sae_id in saes:
        other = same_folder.setdefault(sae_id.casefold(), sae_id)
        if other != sae_id:
            raise ValueError(
                f"SAE ids {other!r} and {sae_id!r} name the same folder on case-insensitive file "
                "systems (macOS, Windows), where one SAE would replace the other; give each SAE "
                "an id of its own"
            )
    if "/" in release:
        raise ValueError(
            f"release name {release!r} contains '/': SAELens reads such names as repository ids"
        )
    if (model is None) != (tokens is None):
        raise ValueError("to measure the metrics pass both model= and tokens=, or neither")
    if metrics is not None and model is not None:
        raise ValueError("pass either metrics= or model= and tokens=, not both")
    unknown = sorted(set(metrics or {}) - set(saes))
    if unknown:
        raise ValueError(f"metrics given for unknown SAE ids {unknown}; the SAEs are {list(saes)}")


def _load(ref: SAE[Any] | str | Path, sae_id: str) -> tuple[SAE[Any], Tensor | None]:
    if isinstance(ref, TrainingSAE):
        with tempfile.TemporaryDirectory() as tmp:
            ref.save_inference_model(tmp)
            return SAE.load_from_disk(tmp, device=str(ref.device)), None
    if isinstance(ref, SAE):
        return ref, None
    folder = Path(ref)
    missing = [name for name in SAE_FILES[:2] if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"SAE {sae_id!r}: {folder} is not a saved SAE folder, it lacks {missing} "
            f"(expected {list(SAE_FILES)})"
        )
    sae = SAE.load_from_disk(folder)
    sparsity_file = folder / SPARSITY_FILENAME
    sparsity = load_file(sparsity_file)["sparsity"] if sparsity_file.is_file() else None
    return sae, sparsity


def _model_name(loaded: Mapping[str, tuple[SAE[Any], Tensor | None]], given: str | None) -> str:
    recorded = {
        sae_id: sae.cfg.metadata.model_name
        for sae_id, (sae, _) in loaded.items()
        if sae.cfg.metadata.model_name is not None
    }
    names = set(recorded.values()) | ({given} if given else set())
    if len(names) != 1:
        raise ValueError(
            "a release reads one model, named in its YAML entry: "
            + (f"model_name={given!r} but " if given else "")
            + f"the SAEs record {recorded or 'no model name'}; pass model_name= (e.g. 'gpt2-small') "
            "when the SAEs record none"
        )
    return names.pop()


def _site_of(sae: SAE[Any], model: Any, sae_id: str) -> AttnSite:
    if sae.cfg.reshape_activations != "hook_z":
        raise ValueError(
            f"SAE {sae_id!r} has reshape_activations={sae.cfg.reshape_activations!r}; published "
            "attention SAEs take z as [..., n_heads, d_head] (reshape_activations='hook_z'), as "
            "sae_lens_attn's attn_* configs save them. For an SAE saved by SAELens's runner, set "
            "sae.cfg.reshape_activations = 'hook_z' and call "
            "sae.turn_on_forward_pass_hook_z_reshaping() first."
        )
    read_attention_metadata(sae.cfg.metadata, d_in=sae.cfg.d_in, source=f"SAE {sae_id!r}")
    return AttnSite.from_sae(sae, model)


def _write_sae(
    folder: Path, sae: SAE[Any], site: AttnSite, sparsity: Tensor, model_name: str
) -> None:
    sae.save_model(folder)
    cfg_path = folder / SAE_CFG_FILENAME
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    recorded = read_attention_metadata(cfg["metadata"], source=str(cfg_path))
    cfg["metadata"].update(
        attention_metadata(
            site,
            recorded.value_bias_convention,
            model_name=model_name,
            hf_architecture=recorded.hf_architecture,
            model_from_pretrained_kwargs=recorded.model_from_pretrained_kwargs,
        )
    )
    cfg_path.write_text(json.dumps(cfg), encoding="utf-8")
    save_file(
        {"sparsity": sparsity.detach().float().cpu().contiguous()}, folder / SPARSITY_FILENAME
    )
