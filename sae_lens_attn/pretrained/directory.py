"""Our releases inside SAELens's pretrained directory and loader tables.

SAELens reads releases from ``get_pretrained_saes_directory()``, an ``lru_cache`` over its
packaged YAML. ``register_pretrained()`` (run at ``import sae_lens_attn``, idempotent, no network)
registers this package's converters and puts a thin wrapper in front of that function, in
``sae_lens.loading.pretrained_saes_directory`` and in every module that imported it: each call
returns SAELens's cached dict with our releases merged in, so they survive ``cache_clear()``.

Three sources of releases, all in SAELens's YAML format:

- the package's own (``releases.yaml``: ``gpt2-small-attn-z``);
- releases registered with ``register_release``;
- the files named by the environment variable ``SAE_LENS_ATTN_RELEASES`` (paths separated by
  ``os.pathsep``), read on every lookup, so setting it after import works.

A name that SAELens already uses is refused: ``register_release`` and release files raise.
"""

from __future__ import annotations

import difflib
import functools
import os
import sys
import warnings
from collections.abc import Callable
from importlib.resources import files
from pathlib import Path
from typing import Any

from sae_lens.loading import pretrained_saes_directory as saes_directory_module
from sae_lens.loading.pretrained_sae_loaders import (
    NAMED_PRETRAINED_SAE_CONFIG_GETTERS,
    NAMED_PRETRAINED_SAE_LOADERS,
)
from sae_lens.loading.pretrained_saes_directory import PretrainedSAELookup

from sae_lens_attn.pretrained.kissane import (
    KISSANE_CONVERSION_FUNC,
    get_kissane_config_from_hf,
    kissane_huggingface_loader,
)
from sae_lens_attn.pretrained.releases import Release, parse_releases_yaml, read_releases_file

RELEASES_ENV_VAR = "SAE_LENS_ATTN_RELEASES"
"""Environment variable naming release files (SAELens YAML format), separated by ``os.pathsep``."""

CONVERTERS: dict[str, tuple[Callable[..., Any], Callable[..., Any]]] = {
    KISSANE_CONVERSION_FUNC: (kissane_huggingface_loader, get_kissane_config_from_hf),
}
"""``conversion_func`` name → (loader, config getter) this package adds to SAELens's tables."""

_DIRECTORY_FUNCTION = "get_pretrained_saes_directory"
_HOOK_MARK = "_sae_lens_attn_directory_hook"

_packaged: dict[str, Release] = {}
_registered: dict[str, Release] = {}
_added: dict[str, tuple[Release, PretrainedSAELookup]] = {}
_env_cache: dict[tuple[str, int, int], dict[str, Release]] = {}
_warned: set[str] = set()


def register_pretrained() -> None:
    """Register the converters and releases of this package with SAELens (idempotent).

    Reads only files inside the package: no network, and SAELens's own YAML is not parsed here.

    Raises:
        ValueError: another package registered a converter under one of our names.
    """
    for name, (loader, config_getter) in CONVERTERS.items():
        for table, function in (
            (NAMED_PRETRAINED_SAE_LOADERS, loader),
            (NAMED_PRETRAINED_SAE_CONFIG_GETTERS, config_getter),
        ):
            existing = table.get(name)
            if existing is not None and not _ours(existing):
                raise ValueError(
                    f"SAELens loader {name!r} is already registered by "
                    f"{getattr(existing, '__module__', existing)}; sae_lens_attn cannot register its own"
                )
            table[name] = function  # type: ignore[assignment]
    packaged = files("sae_lens_attn.pretrained").joinpath("releases.yaml")
    _packaged.update(  # keeps releases added by register_packaged_release
        parse_releases_yaml(
            packaged.read_text(encoding="utf-8"), source="sae_lens_attn releases.yaml"
        )
    )
    _install_directory_hook()
    _refresh()


def register_packaged_release(release: Release) -> Release:
    """Add a release shipped inside this package (idempotent, offline).

    Packaged releases are this package's own, like those of ``releases.yaml``: the name is
    checked against SAELens's directory only when that directory is built, where SAELens's own
    release of the same name wins with a warning. So nothing here parses SAELens's YAML.
    """
    _packaged[release.name] = release
    _refresh()
    return release


def register_release(release: Release, *, replace: bool = False) -> Release:
    """Make ``release`` resolvable by name: ``SAE.from_pretrained(release.name, sae_id)``.

    Args:
        release: the release (e.g. ``Release.from_yaml_entry(name, entry)`` or one built directly).
        replace: replace a different release registered earlier under the same name.

    Returns:
        ``release``.

    Raises:
        ValueError: the name is a SAELens release, a release of this package or of a releases
            file, or was registered with different contents (without ``replace``); or its
            ``conversion_func`` is not a registered loader (the message lists them).

    Example:
        >>> sla.register_release(sla.Release(name="my-attn-saes", repo_id="me/attn-saes",
        ...     model="gpt2-small", saes=(sla.ReleaseSAE("blocks.3", "blocks.3.attn.hook_z"),)))
    """
    _check_conversion_func(release)
    name = release.name
    if name in _packaged:
        raise ValueError(
            f"release name {name!r} is a release of sae_lens_attn; choose another name"
        )
    check_not_saelens_release(name, "register_release")
    env = _env_releases()
    if name in env:
        raise ValueError(
            f"release {name!r} is already defined in a releases file named by {RELEASES_ENV_VAR} "
            f"({os.environ.get(RELEASES_ENV_VAR)}); define it in one place only"
        )
    existing = _registered.get(name)
    if existing is not None and existing != release and not replace:
        raise ValueError(
            f"release {name!r} is already registered with different contents; pass replace=True "
            "to replace it"
        )
    _registered[name] = release
    _refresh()
    return release


def unregister_release(name: str) -> None:
    """Remove a release added with ``register_release``.

    Raises:
        ValueError: no release of that name was registered; the message lists those that were.
    """
    if name not in _registered:
        raise ValueError(
            f"no release {name!r} was registered with register_release; registered: "
            f"{sorted(_registered)}"
        )
    del _registered[name]
    _refresh()


def get_release(name: str) -> Release:
    """The release called ``name``: one of ours, a registered one, or SAELens's own.

    Raises:
        ValueError: there is no such release; the message lists the attention releases and the
            closest SAELens release names.
    """
    ours = attention_releases()
    if name in ours:
        return ours[name]
    directory = _base_directory()()
    if name in directory:
        return Release.from_lookup(directory[name])
    saelens_names = [n for n in directory if n not in ours]
    close = difflib.get_close_matches(name, saelens_names, n=5, cutoff=0.6)
    raise ValueError(
        f"unknown release {name!r}. Attention releases: {sorted(ours)}; closest of SAELens's "
        f"{len(saelens_names)} releases: {close}. Register one with sae_lens_attn.register_release, "
        f"list release files in {RELEASES_ENV_VAR}, or pass a Hugging Face repo id 'owner/name'."
    )


def attention_releases() -> dict[str, Release]:
    """Releases this package adds to SAELens's directory: its own, registered ones and those of
    the files named by ``SAE_LENS_ATTN_RELEASES``."""
    return {**_packaged, **_registered, **_env_releases()}


class _DirectoryWithAttentionReleases:
    """``get_pretrained_saes_directory`` of SAELens, with this package's releases merged in."""

    def __init__(self, base: Callable[[], dict[str, PretrainedSAELookup]]) -> None:
        functools.update_wrapper(self, base)
        self.__wrapped__ = base
        setattr(self, _HOOK_MARK, True)

    def __call__(self) -> dict[str, PretrainedSAELookup]:
        directory = self.__wrapped__()
        _merge(directory)
        return directory

    def cache_clear(self) -> None:
        """Clear SAELens's cache; our releases are merged into the rebuilt directory."""
        self.__wrapped__.cache_clear()  # type: ignore[attr-defined]

    def cache_info(self) -> Any:
        """SAELens's cache statistics."""
        return self.__wrapped__.cache_info()  # type: ignore[attr-defined]


def _base_directory() -> Callable[[], dict[str, PretrainedSAELookup]]:
    current = vars(saes_directory_module)[_DIRECTORY_FUNCTION]
    return current.__wrapped__ if getattr(current, _HOOK_MARK, False) else current


def _install_directory_hook() -> None:
    base = _base_directory()
    hook = _DirectoryWithAttentionReleases(base)
    for module in list(sys.modules.values()):
        namespace = getattr(module, "__dict__", None)
        if not isinstance(namespace, dict):
            continue
        bound = namespace.get(_DIRECTORY_FUNCTION)
        if bound is base or getattr(bound, _HOOK_MARK, False):
            namespace[_DIRECTORY_FUNCTION] = hook


def _refresh() -> None:
    """Merge into SAELens's cached directory now, if it has been built."""
    base = _base_directory()
    if base.cache_info().currsize:  # type: ignore[attr-defined]
        _merge(base())


def _merge(directory: dict[str, PretrainedSAELookup]) -> None:
    packaged, registered, env = dict(_packaged), dict(_registered), _env_releases()
    wanted = {**packaged, **registered, **env}
    for name, (_, lookup) in list(_added.items()):
        if name not in wanted or wanted[name] != _added[name][0]:
            if directory.get(name) is lookup:
                del directory[name]
            del _added[name]
    for name, release in wanted.items():
        existing = directory.get(name)
        added = _added.get(name)
        if existing is not None and (added is None or existing is not added[1]):
            if name in env:
                raise ValueError(
                    f"release {name!r} in a releases file named by {RELEASES_ENV_VAR} "
                    f"({os.environ.get(RELEASES_ENV_VAR)}) collides with SAELens's release of the "
                    f"same name (repo {existing.repo_id}); rename it in that file"
                )
            if name in packaged and name not in _warned:
                _warned.add(name)
                warnings.warn(
                    f"SAELens now ships a release named {name!r}; using SAELens's entry instead "
                    "of sae_lens_attn's",
                    stacklevel=3,
                )
            continue
        if added is None or existing is None:
            lookup = release.to_lookup()
            directory[name] = lookup
            _added[name] = (release, lookup)


def check_not_saelens_release(name: str, what: str) -> None:
    """Raise ``ValueError`` if SAELens itself has a release called ``name``.

    Args:
        name: the release name.
        what: the operation, for the message.
    """
    directory = _base_directory()()
    existing = directory.get(name)
    added = _added.get(name)
    if existing is not None and (added is None or existing is not added[1]):
        raise ValueError(
            f"{what}: release name {name!r} is already a SAELens release (repo "
            f"{existing.repo_id}, {len(existing.saes_map)} SAEs); choose a name SAELens does not use"
        )


def _check_conversion_func(release: Release) -> None:
    func = release.conversion_func
    if func is not None and func not in NAMED_PRETRAINED_SAE_LOADERS:
        raise ValueError(
            f"release {release.name!r}: unknown conversion_func {func!r}; valid: "
            f"{sorted(NAMED_PRETRAINED_SAE_LOADERS)} (or null for SAELens's native format)"
        )


def _env_releases() -> dict[str, Release]:
    value = os.environ.get(RELEASES_ENV_VAR, "")
    releases: dict[str, Release] = {}
    for entry in filter(None, value.split(os.pathsep)):
        path = Path(entry)
        try:
            stat = path.stat()
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{RELEASES_ENV_VAR} names {entry!r}, which does not exist; expected a releases "
                "file in SAELens's pretrained_saes.yaml format"
            ) from None
        key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
        if key not in _env_cache:
            if len(_env_cache) > 32:
                _env_cache.clear()
            _env_cache[key] = read_releases_file(path)
        for name, release in _env_cache[key].items():
            if name in releases or name in _packaged or name in _registered:
                elsewhere = (
                    "in another file it names"
                    if name in releases
                    else "a release of sae_lens_attn or one added with register_release"
                )
                raise ValueError(
                    f"release {name!r} in {entry} (named by {RELEASES_ENV_VAR}) is defined "
                    f"twice: it is also {elsewhere}; rename one of them"
                )
            _check_conversion_func(release)
            releases[name] = release
    return releases


def _ours(function: Any) -> bool:
    return getattr(function, "__module__", "").startswith("sae_lens_attn.")
