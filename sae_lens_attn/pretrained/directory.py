"""Our releases and loaders inside SAELens's pretrained directory and loader tables.

This is the one module that writes to SAELens's pretrained tables. SAELens 6.54 has no public
function to add a release or a loader, so it writes to the two places SAELens reads:

- the loader tables ``NAMED_PRETRAINED_SAE_LOADERS`` / ``NAMED_PRETRAINED_SAE_CONFIG_GETTERS``
  (public module-level dicts, which ``SAE.from_pretrained`` reads by ``conversion_func``);
- the directory: the dict that ``get_pretrained_saes_directory()`` (a ``functools.cache`` over
  SAELens's packaged YAML) returns. Every SAELens lookup calls that function and reads the one
  cached dict, so releases added to it resolve by name. No SAELens name is rebound.

``tests/test_pretrained_releases.py`` pins the SAELens behaviour this relies on. What follows
from it: SAELens's YAML is parsed when ``sae_lens_attn`` is imported (the dict must exist to be
added to), and ``get_pretrained_saes_directory.cache_clear()`` builds a new dict without our
releases; ``register_pretrained()`` (or any function of this module) puts them back.

Three sources of releases, all in SAELens's YAML format:

- the package's own (``releases.yaml``: ``gpt2-small-attn-z``; ``stdlib-2l-attn-z``);
- releases registered with ``register_release``;
- the files named by the environment variable ``SAE_LENS_ATTN_RELEASES`` (paths separated by
  ``os.pathsep``), read at import and again by every function of this module, so a change of the
  variable after import takes effect at the next ``register_pretrained()``. A file that cannot
  be read (missing, a folder, not text, not YAML, invalid releases) or a release whose name is
  taken is left out with one warning naming the variable and the file; it never breaks SAELens's
  own releases.
"""

from __future__ import annotations

import difflib
import os
import warnings
from collections.abc import Callable
from importlib.resources import files
from pathlib import Path
from typing import Any

from sae_lens.loading.pretrained_sae_loaders import (
    NAMED_PRETRAINED_SAE_CONFIG_GETTERS,
    NAMED_PRETRAINED_SAE_LOADERS,
)
from sae_lens.loading.pretrained_saes_directory import (
    PretrainedSAELookup,
    get_pretrained_saes_directory,
)

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

_packaged: dict[str, Release] = {}
_registered: dict[str, Release] = {}
_from_env: dict[str, Release] = {}
_added: dict[str, PretrainedSAELookup] = {}
"""Lookups this module put into SAELens's directory, by release name."""
_merged_into: list[dict[str, PretrainedSAELookup]] = []
"""The directory dict ``_added`` refers to (a new one after ``cache_clear``)."""
_env_files: dict[str, str] = {}
"""Release name → the file named by the environment variable that defines it."""
_env_cache: dict[tuple[str, int, int], dict[str, Release] | str] = {}
_warned: set[tuple[str, ...]] = set()


def register_pretrained() -> None:
    """Register this package's converters and releases with SAELens (idempotent, offline).

    Call it again after changing ``SAE_LENS_ATTN_RELEASES`` or after
    ``get_pretrained_saes_directory.cache_clear()``.

    Raises:
        ValueError: another package registered a converter under one of our names.
    """
    for name, (loader, config_getter) in CONVERTERS.items():
        register_converter(name, loader, config_getter)
    packaged = files("sae_lens_attn.pretrained").joinpath("releases.yaml")
    _packaged.update(  # keeps releases added by register_packaged_release
        parse_releases_yaml(
            packaged.read_text(encoding="utf-8"), source="sae_lens_attn releases.yaml"
        )
    )
    _sync()


def register_converter(
    name: str, loader: Callable[..., Any], config_getter: Callable[..., Any]
) -> None:
    """Put a loader and its config getter into SAELens's tables as ``conversion_func`` ``name``.

    An entry of this package (an earlier import or a reload) is replaced.

    Raises:
        ValueError: another package registered a loader under ``name``.
    """
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


def register_packaged_release(release: Release) -> Release:
    """Add a release shipped inside this package (idempotent, offline).

    Where SAELens itself ships a release of the same name, SAELens's entry wins, with a warning.
    """
    _packaged[release.name] = release
    _sync()
    return release


def register_release(release: Release, *, replace: bool = False) -> Release:
    """Make ``release`` resolvable by name: ``SAE.from_pretrained(release.name, sae_id)``.

    Args:
        release: the release (e.g. ``Release.from_yaml_entry(name, entry)`` or one built directly).
        replace: replace a different release registered earlier under the same name.

    Returns:
        ``release``.

    Raises:
        TypeError: ``release`` is not a ``Release``.
        ValueError: the name is a SAELens release, a release of this package or of a releases
            file, or was registered with different contents (without ``replace``); or its
            ``conversion_func`` is not a registered loader (the message lists them).

    Examples:
        >>> sla.register_release(sla.Release(name="my-attn-saes", repo_id="me/attn-saes",
        ...     model="gpt2-small", saes=(sla.ReleaseSAE("blocks.3", "blocks.3.attn.hook_z"),)))
    """
    if not isinstance(release, Release):
        raise TypeError(
            f"register_release expects a sae_lens_attn.Release, got {type(release).__name__}; "
            "supported: Release (build one with Release(name=..., repo_id=..., model=..., "
            "saes=...), or from a pretrained_saes.yaml entry with "
            "Release.from_yaml_entry(name, entry))"
        )
    _check_conversion_func(release)
    name = release.name
    if name in _packaged:
        raise ValueError(
            f"release name {name!r} is a release of sae_lens_attn; choose another name"
        )
    check_not_saelens_release(name, "register_release")
    if name in _from_env:
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
    _sync()
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
    _sync()


def get_release(name: str) -> Release:
    """The release called ``name``: one of ours, a registered one, or SAELens's own.

    Raises:
        ValueError: there is no such release; the message lists the attention releases and the
            closest SAELens release names.
    """
    directory = _sync()
    ours = attention_releases()
    if name in ours:
        return ours[name]
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
    """Releases this package has in SAELens's directory: its own, registered ones and those of
    the files named by ``SAE_LENS_ATTN_RELEASES`` (without those SAELens's own releases hide)."""
    _sync()
    return {name: release for name, release in _wanted().items() if name in _added}


def list_releases() -> dict[str, list[str]]:
    """Release name → its SAE ids, for every release of ``attention_releases()``, sorted by name.

    Examples:
        >>> sla.list_releases()["gpt2-small-attn-z"][:3]
        ['blocks.0', 'blocks.1', 'blocks.2']
    """
    return {name: release.ids for name, release in sorted(attention_releases().items())}


def check_not_saelens_release(name: str, what: str) -> None:
    """Raise ``ValueError`` if SAELens itself has a release called ``name``.

    Args:
        name: the release name.
        what: the operation, for the message.
    """
    existing = _sync().get(name)
    if existing is not None and existing is not _added.get(name):
        raise ValueError(
            f"{what}: release name {name!r} is already a SAELens release (repo "
            f"{existing.repo_id}, {len(existing.saes_map)} SAEs); choose a name SAELens does not use"
        )


def _wanted() -> dict[str, Release]:
    return {**_packaged, **_registered, **_from_env}


def _sync() -> dict[str, PretrainedSAELookup]:
    """Re-read the releases files and make SAELens's directory hold exactly our releases."""
    directory = get_pretrained_saes_directory()
    if not _merged_into or _merged_into[0] is not directory:  # first call, or cache_clear()
        _added.clear()
        _merged_into[:] = [directory]
    _from_env.clear()
    _from_env.update(_env_releases())
    wanted = _wanted()
    for name, lookup in list(_added.items()):
        if name not in wanted or wanted[name].to_lookup() != lookup:
            if directory.get(name) is lookup:
                del directory[name]
            del _added[name]
    for name, release in wanted.items():
        existing = directory.get(name)
        if existing is not None and existing is not _added.get(name):
            _warn_saelens_has(name, existing)
        elif name not in _added:
            _added[name] = directory[name] = release.to_lookup()
    return directory


def _warn_saelens_has(name: str, existing: PretrainedSAELookup) -> None:
    if name in _packaged:
        _warn_once(
            ("packaged", name),
            f"SAELens now ships a release named {name!r}; using SAELens's entry instead of "
            "sae_lens_attn's",
        )
        return
    source = _env_files.get(name, "a releases file")
    _warn_once(
        ("collides", name, source),
        f"{RELEASES_ENV_VAR}: release {name!r} in {source} is left out: SAELens has a release of "
        f"the same name (repo {existing.repo_id}); rename it in that file",
    )


def _env_releases() -> dict[str, Release]:
    """The releases of the files named by ``SAE_LENS_ATTN_RELEASES``; bad files and names taken
    elsewhere are left out, each with one warning."""
    releases: dict[str, Release] = {}
    _env_files.clear()
    for entry in filter(None, os.environ.get(RELEASES_ENV_VAR, "").split(os.pathsep)):
        read = _read_env_file(Path(entry))
        if isinstance(read, str):
            _warn_once(
                ("file", entry, read),
                f"{RELEASES_ENV_VAR} names {entry!r}, which is left out: {read}. Expected a "
                "releases file in SAELens's pretrained_saes.yaml format",
            )
            continue
        for name, release in read.items():
            problem = _env_release_problem(name, release, releases)
            if problem is not None:
                _warn_once(
                    ("release", entry, name, problem),
                    f"{RELEASES_ENV_VAR}: release {name!r} in {entry} is left out: {problem}",
                )
                continue
            releases[name] = release
            _env_files[name] = entry
    return releases


def _env_release_problem(name: str, release: Release, earlier: dict[str, Release]) -> str | None:
    """Why a release of a releases file cannot be added, or ``None``."""
    if name in earlier:
        return f"it is also in {_env_files[name]}; rename one of them"
    if name in _packaged:
        return "it is a release of sae_lens_attn; rename it"
    if name in _registered:
        return "it is a release added with register_release; rename one of them"
    func = release.conversion_func
    if func is not None and func not in NAMED_PRETRAINED_SAE_LOADERS:
        return (
            f"unknown conversion_func {func!r}; valid: {sorted(NAMED_PRETRAINED_SAE_LOADERS)} "
            "(or null for SAELens's native format)"
        )
    return None


def _read_env_file(path: Path) -> dict[str, Release] | str:
    """The releases of ``path``, or why it cannot be read (cached while the file is unchanged)."""
    try:
        stat = path.stat()
    except OSError as err:
        return f"it cannot be read ({type(err).__name__}: {err.strerror or err})"
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    if key not in _env_cache:
        if len(_env_cache) > 32:
            _env_cache.clear()
        try:
            _env_cache[key] = read_releases_file(path)
        except OSError as err:
            _env_cache[key] = f"it cannot be read ({type(err).__name__}: {err.strerror or err})"
        except ValueError as err:
            _env_cache[key] = str(err)
    return _env_cache[key]


def _warn_once(key: tuple[str, ...], message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, UserWarning, stacklevel=2)


def _check_conversion_func(release: Release) -> None:
    func = release.conversion_func
    if func is not None and func not in NAMED_PRETRAINED_SAE_LOADERS:
        raise ValueError(
            f"release {release.name!r}: unknown conversion_func {func!r}; valid: "
            f"{sorted(NAMED_PRETRAINED_SAE_LOADERS)} (or null for SAELens's native format)"
        )


def _ours(function: Any) -> bool:
    return getattr(function, "__module__", "").startswith("sae_lens_attn.")
