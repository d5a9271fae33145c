"""``xpconv serve``: a local web page to draw a digit and watch a checkpoint answer, and
the learning curves of the runs under a folder, updating while ``xpconv train`` writes.

Needs the optional extra ``xpconv[serve]`` (Starlette and uvicorn).  The app is built by
:func:`xpconv.serve.app.create_app`; :func:`xpconv.serve.app.run` starts uvicorn on it.

Pages and API (all read-only; nothing is fetched from another site):

* ``/``: a canvas to draw on (mouse, pen and touch), a drop zone for an image file, the
  class probabilities, the predicted class and the first convolution layer's feature maps.
* ``/runs``: every run under ``--runs`` with its curves, polled while they grow.
* ``GET /api/model``, ``POST /api/predict``, ``GET /api/runs``, ``GET /api/runs/<name>/metrics``.
"""

from __future__ import annotations

__all__ = ["create_app", "run"]


def __getattr__(name: str):
    # Starlette is imported only when the app is wanted (the package imports without the extra)
    if name in __all__:
        from . import app

        return getattr(app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
