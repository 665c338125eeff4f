"""Where clients run: the layer between the round loop and the clients.

The round loop (:mod:`skfedmm.engine`) sends the round's payload to the
active clients and gets back each client's message or its failure; this
package decides where the clients' computation happens. Nothing here
imports the round loop.

- :mod:`skfedmm.federation.transport`: the :class:`Transport` interface the
  round loop uses, and :class:`LocalTransport`;
- :mod:`skfedmm.federation.client`: a client's part of a round, the same
  functions wherever clients run;
- :mod:`skfedmm.federation.local`: clients in this process, in joblib's
  workers (threads, loky or multiprocessing processes) or on a Dask
  cluster; placement of the clients' rows, BLAS limits, client timeouts.
"""

from .transport import LocalTransport, Transport

__all__ = ["LocalTransport", "Transport"]
