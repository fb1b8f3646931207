"""anyio beside nnsight: the one place that touches nnsight's ``object.save`` mount.

nnsight's default configuration writes a ``save`` method into ``object`` when it is imported.
anyio checks, when it creates its typed-attribute classes (``SocketAttribute``, ``TLSAttribute``,
``FileStreamAttribute``), that every public attribute is annotated, and so fails on ``save``
once nnsight is in the process; Starlette's thread pool and request bodies then fail with
``TypeError: Attribute 'save' is missing its type annotation``. ``prepare_anyio`` imports those
anyio modules with the mount lifted for that moment and puts it back; once created, the classes
are never checked again. ``tests/test_explorer.py`` pins the host behaviour this relies on.
"""

from __future__ import annotations

import importlib
import sys

ANYIO_MODULES = (
    "anyio.abc",
    "anyio.streams.file",
    "anyio.streams.tls",
    "anyio._backends._asyncio",
)
"""The anyio modules whose classes check their attributes' annotations when they are created,
and the asyncio backend that imports them lazily."""


def prepare_anyio() -> None:
    """Import ``ANYIO_MODULES``, with nnsight's ``object.save`` lifted while they load.

    Call before serving (idempotent, cheap once done). Does nothing to nnsight when it is not
    imported or did not mount ``save``.
    """
    if all(name in sys.modules for name in ANYIO_MODULES):
        return
    mounted = "save" in vars(object) and "nnsight" in sys.modules
    if not mounted:
        _import_all()
        return
    from nnsight._c import mount, unmount

    saved = vars(object)["save"].__func__  # the mount wraps nnsight.save in an instancemethod
    unmount("save")
    try:
        _import_all()
    finally:
        mount(saved, "save")


def _import_all() -> None:
    for name in ANYIO_MODULES:
        importlib.import_module(name)
