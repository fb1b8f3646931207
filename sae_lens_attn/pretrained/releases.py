"""Releases in SAELens's ``pretrained_saes.yaml`` format, as frozen values.

A release maps SAE ids to files in one Hugging Face repository. This module only parses,
validates and writes that format; ``directory.py`` puts releases into SAELens's directory.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from sae_lens.loading.pretrained_saes_directory import PretrainedSAELookup

RELEASE_KEYS = ("repo_id", "model", "saes", "conversion_func", "config_overrides", "links")
"""Keys a release entry of ``pretrained_saes.yaml`` may have (the first three are required)."""
SAE_KEYS = ("id", "path", "l0", "variance_explained", "neuronpedia", "norm_scaling_factor")
"""Keys one SAE of a release may have (``id`` and ``path`` are required)."""

# SAELens's directory reads a missing `variance_explained` as 1.0 and a missing `l0` as 0.0.
_SAELENS_DEFAULT_VARIANCE_EXPLAINED = 1.0
_SAELENS_DEFAULT_L0 = 0.0


@dataclass(frozen=True)
class ReleaseSAE:
    """One SAE of a release: its id and where its files are in the release's repository."""

    id: str
    """The id users pass to ``SAE.from_pretrained(release, id)``."""
    path: str
    """Folder (SAELens format) or file (converted formats) of the SAE inside the repository."""
    l0: float | None = None
    """Measured mean number of active features per token; ``None`` when not measured."""
    variance_explained: float | None = None
    """Measured explained variance of the reconstruction; ``None`` when not measured."""
    neuronpedia: str | None = None
    """Neuronpedia id of the SAE's dashboards, if it has them (unique across SAELens)."""
    norm_scaling_factor: float | None = None
    """Activation norm scaling factor SAELens folds in at load time, if any."""

    def to_yaml_entry(self) -> dict[str, Any]:
        """This SAE as an item of a release's ``saes`` list (unset fields left out)."""
        entry: dict[str, Any] = {"id": self.id, "path": self.path}
        for key in SAE_KEYS[2:]:
            value = getattr(self, key)
            if value is not None:
                entry[key] = value
        return entry


@dataclass(frozen=True)
class Release:
    """A named set of SAEs in one Hugging Face repository, as in ``pretrained_saes.yaml``."""

    name: str
    """Release name users pass to ``SAE.from_pretrained``; never contains ``/``, which SAELens
    reads as a repository id."""
    repo_id: str
    """Hugging Face repository, ``owner/name``."""
    model: str
    """Name of the model the SAEs read, as TransformerLens and SAELens name it (``gpt2-small``)."""
    saes: tuple[ReleaseSAE, ...]
    """The SAEs, in the order they are listed."""
    conversion_func: str | None = None
    """Name of the loader in SAELens's ``NAMED_PRETRAINED_SAE_LOADERS``; ``None`` means SAELens's
    native format (``sae_lens``)."""
    config_overrides: Mapping[str, Any] | None = field(default=None, hash=False)
    """Values SAELens passes to the loader as ``cfg_overrides`` for every SAE of the release."""
    links: Mapping[str, str] | None = field(default=None, hash=False)
    """Links shown in SAELens's docs (``model``, ``publication``, ``dashboards``, ...)."""

    def __post_init__(self) -> None:
        for key in ("name", "repo_id", "model"):
            value = getattr(self, key)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"release {key} must be a non-empty string, got {value!r}")
        if "/" in self.name:
            raise ValueError(
                f"release name {self.name!r} contains '/': SAELens reads such names as Hugging "
                "Face repository ids, so the release could never be found by name"
            )
        if self.repo_id.count("/") != 1 or not all(self.repo_id.split("/")):
            raise ValueError(
                f"release {self.name!r}: repo_id must be 'owner/name', got {self.repo_id!r}"
            )
        if not self.saes:
            raise ValueError(f"release {self.name!r} lists no SAEs")
        seen: set[str] = set()
        for sae in self.saes:
            if not isinstance(sae, ReleaseSAE):
                raise TypeError(f"release {self.name!r}: expected ReleaseSAE items, got {sae!r}")
            if sae.id in seen:
                raise ValueError(f"release {self.name!r} lists the SAE id {sae.id!r} twice")
            seen.add(sae.id)

    @property
    def ids(self) -> list[str]:
        """SAE ids of the release, in order."""
        return [sae.id for sae in self.saes]

    def sae(self, sae_id: str) -> ReleaseSAE:
        """The SAE with id ``sae_id``.

        Raises:
            ValueError: the release has no such id; the message lists every id it has.
        """
        for sae in self.saes:
            if sae.id == sae_id:
                return sae
        raise ValueError(
            f"release {self.name!r} has no SAE with id {sae_id!r}; valid ids: {self.ids}"
        )

    def to_yaml_entry(self) -> dict[str, Any]:
        """The release's value in ``pretrained_saes.yaml`` (its name is the key)."""
        entry: dict[str, Any] = {
            "conversion_func": self.conversion_func,
            "model": self.model,
            "repo_id": self.repo_id,
            "saes": [sae.to_yaml_entry() for sae in self.saes],
        }
        if self.links:
            entry["links"] = dict(self.links)
        if self.config_overrides:
            entry["config_overrides"] = dict(self.config_overrides)
        return entry

    def to_lookup(self) -> PretrainedSAELookup:
        """The release as SAELens's directory holds it, read exactly as SAELens reads its YAML."""
        return PretrainedSAELookup(
            release=self.name,
            repo_id=self.repo_id,
            model=self.model,
            conversion_func=self.conversion_func,
            saes_map={sae.id: sae.path for sae in self.saes},
            expected_var_explained={
                sae.id: _or(sae.variance_explained, _SAELENS_DEFAULT_VARIANCE_EXPLAINED)
                for sae in self.saes
            },
            expected_l0={sae.id: _or(sae.l0, _SAELENS_DEFAULT_L0) for sae in self.saes},
            neuronpedia_id={sae.id: sae.neuronpedia for sae in self.saes},  # type: ignore[misc]
            norm_scaling_factor={
                sae.id: sae.norm_scaling_factor
                for sae in self.saes
                if sae.norm_scaling_factor is not None
            },
            config_overrides=dict(self.config_overrides) if self.config_overrides else None,
        )

    @classmethod
    def from_lookup(cls, lookup: PretrainedSAELookup) -> Release:
        """A release from SAELens's directory (its ``l0`` and ``variance_explained`` are SAELens's
        values, defaults included)."""
        return cls(
            name=lookup.release,
            repo_id=lookup.repo_id,
            model=lookup.model,
            saes=tuple(
                ReleaseSAE(
                    id=sae_id,
                    path=path,
                    l0=lookup.expected_l0.get(sae_id),
                    variance_explained=lookup.expected_var_explained.get(sae_id),
                    neuronpedia=lookup.neuronpedia_id.get(sae_id),
                    norm_scaling_factor=lookup.norm_scaling_factor.get(sae_id),
                )
                for sae_id, path in lookup.saes_map.items()
            ),
            conversion_func=lookup.conversion_func,
            config_overrides=lookup.config_overrides,
        )

    @classmethod
    def from_yaml_entry(cls, name: str, entry: Any, *, source: str = "YAML") -> Release:
        """Validate and read one release entry of ``pretrained_saes.yaml``.

        Args:
            name: the release name (the entry's key).
            entry: the entry's value.
            source: where the entry comes from, for error messages.

        Raises:
            ValueError: the entry is not a valid release; the message names ``source``.
        """
        where = f"release {name!r} in {source}"
        entry = _mapping(entry, where, RELEASE_KEYS)
        missing = [key for key in RELEASE_KEYS[:3] if key not in entry]
        if missing:
            raise ValueError(f"{where} lacks {missing}; a release needs {list(RELEASE_KEYS[:3])}")
        saes = entry["saes"]
        if not isinstance(saes, list):
            raise ValueError(f"{where}: 'saes' must be a list of {{id, path, ...}}, got {saes!r}")
        overrides = entry.get("config_overrides")
        if overrides is not None and not isinstance(overrides, Mapping):
            raise ValueError(f"{where}: 'config_overrides' must be a mapping, got {overrides!r}")
        links = entry.get("links")
        if links is not None and not isinstance(links, Mapping):
            raise ValueError(f"{where}: 'links' must be a mapping, got {links!r}")
        try:
            return cls(
                name=str(name),
                repo_id=entry["repo_id"],
                model=entry["model"],
                saes=tuple(_sae_from_yaml(item, where) for item in saes),
                conversion_func=entry.get("conversion_func"),
                config_overrides=dict(overrides) if overrides else None,
                links=dict(links) if links else None,
            )
        except (TypeError, ValueError) as err:
            raise ValueError(f"{where}: {err}") from None


def parse_releases_yaml(text: str, *, source: str = "YAML") -> dict[str, Release]:
    """Read every release of a file in SAELens's ``pretrained_saes.yaml`` format.

    Args:
        text: the file's contents.
        source: where the text comes from, for error messages.

    Returns:
        release name → release, in file order.

    Raises:
        ValueError: the text is not YAML, gives a key twice (a release name, or a key of one
            entry), is not a mapping of releases, or has an invalid release (an SAE id listed
            twice included).
    """
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader
    except _DuplicateKeyError as err:
        raise ValueError(
            f"{source} gives the key {err.key!r} twice ({err.where}); YAML would keep only the "
            "last one, so remove or rename one of them"
        ) from None
    except yaml.YAMLError as err:
        raise ValueError(f"{source} is not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ValueError(
            f"{source} must map release names to releases (SAELens's pretrained_saes.yaml "
            f"format), got a {type(data).__name__}"
        )
    return {
        str(name): Release.from_yaml_entry(name, entry, source=source)
        for name, entry in data.items()
    }


def read_releases_file(path: str | Path) -> dict[str, Release]:
    """Read every release of a file in SAELens's ``pretrained_saes.yaml`` format.

    Raises:
        OSError: the file cannot be read (``FileNotFoundError``, ``IsADirectoryError``, ...).
        ValueError: the file is not text, not YAML, or not a valid releases file.
    """
    path = Path(path)
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{path} is not a text file (not UTF-8 at byte {err.start}); expected YAML"
        ) from None
    if "\x00" in text:
        raise ValueError(f"{path} is not a text file (it holds NUL bytes); expected YAML")
    return parse_releases_yaml(text, source=str(path))


def dump_releases_yaml(releases: Sequence[Release]) -> str:
    """Releases as text in SAELens's ``pretrained_saes.yaml`` format (keys sorted, as there)."""
    data = {release.name: release.to_yaml_entry() for release in releases}
    return yaml.safe_dump(data, sort_keys=True, default_flow_style=False, allow_unicode=True)


class _DuplicateKeyError(yaml.YAMLError):
    def __init__(self, key: Any, where: str) -> None:
        super().__init__(f"duplicate key {key!r} ({where})")
        self.key, self.where = key, where


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a mapping that gives a key twice (it keeps the last)."""

    def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                repeated = key in seen
            except TypeError:  # unhashable: PyYAML's own error follows
                break
            if repeated:
                mark = key_node.start_mark
                raise _DuplicateKeyError(key, f"line {mark.line + 1}, column {mark.column + 1}")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _sae_from_yaml(item: Any, where: str) -> ReleaseSAE:
    item = _mapping(item, f"an SAE of {where}", SAE_KEYS)
    missing = [key for key in SAE_KEYS[:2] if key not in item]
    if missing:
        raise ValueError(f"SAE {dict(item)} lacks {missing}; each SAE needs 'id' and 'path'")
    numbers = {}
    for key in ("l0", "variance_explained", "norm_scaling_factor"):
        value = item.get(key)
        if value is not None and (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            raise ValueError(f"SAE {item['id']!r}: {key} must be a finite number, got {value!r}")
        numbers[key] = None if value is None else float(value)
    return ReleaseSAE(
        id=str(item["id"]),
        path=str(item["path"]),
        neuronpedia=item.get("neuronpedia"),
        **numbers,
    )


def _mapping(value: Any, where: str, valid: Sequence[str]) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ValueError(f"{where} must be a mapping, got {value!r}")
    unknown = sorted(set(value) - set(valid))
    if unknown:
        raise ValueError(f"{where} has unknown keys {unknown}; valid keys: {list(valid)}")
    return value


def _or(value: float | None, default: float) -> float:
    return default if value is None else value
