"""skfedmm on Flower's deployment engine (the optional extra ``skfedmm[flower]``).

The estimators, the round loop and the clients' code are those of an
in-process fit; Flower carries the round's payloads between a ``ServerApp``
and the SuperNodes, each holding one client's rows:

- :func:`make_client_app`: the ``ClientApp`` of a node, built from a
  function that loads the node's rows (they never leave it); the client's
  control variate and random stream stay in the node's state;
- :class:`FlowerTransport`: the round loop's :class:`~skfedmm.federation.Transport`
  over Flower's ``Grid``; ``estimator.fit_transport(transport)`` fits any
  skfedmm estimator on it;
- :func:`make_server_app` / :func:`run_server`: a ``ServerApp`` that fits the
  estimator named in the run configuration and saves it with joblib;
- :mod:`skfedmm.flower.records`: the wire format (Flower records, never
  pickles) and its checks.

See the "Deploying on Flower" page of the documentation.
"""

try:
    import flwr  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "skfedmm.flower needs Flower: pip install 'skfedmm[flower]' (flwr>=1.42)"
    ) from exc

from .node import handle, make_client_app
from .records import WireError, register_problem
from .server import FlowerTransport, NodeStream, make_server_app, register_estimator, run_server

__all__ = [
    "FlowerTransport",
    "NodeStream",
    "WireError",
    "handle",
    "make_client_app",
    "make_server_app",
    "register_estimator",
    "register_problem",
    "run_server",
]
