"""The prompt explorer (``sae-lens-attn explore``): a local web page and JSON API over a model
and its attention SAEs, and a static export of the same views.

Needs the ``explore`` extra (FastAPI, uvicorn): ``pip install 'sae-lens-attn[explore]'``. The
core package never imports this one.

Examples:
    >>> session = ExplorerSession(model, saes)
    >>> with serving(create_app(session)) as url:
    ...     print(url)
"""

from sae_lens_attn.explorer.app import create_app
from sae_lens_attn.explorer.export import Export, export_prompts, read_prompts
from sae_lens_attn.explorer.server import PortInUse, bind, is_loopback, serve, serving, url_of
from sae_lens_attn.explorer.session import (
    MAX_BODY_BYTES,
    ExplorerSession,
    ModelFailed,
    RequestRefused,
)

__all__ = [
    "MAX_BODY_BYTES",
    "ExplorerSession",
    "Export",
    "ModelFailed",
    "PortInUse",
    "RequestRefused",
    "bind",
    "create_app",
    "export_prompts",
    "is_loopback",
    "read_prompts",
    "serve",
    "serving",
    "url_of",
]
