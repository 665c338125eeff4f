"""
Flower ClientApp: a node's rows stay on the node
================================================

The ClientApp reads one node's rows from its node configuration.

Start each SuperNode with ``--node-config 'data-path="/path/to/rows.npy"'``;
the rows are read on the node and never leave it. Replace ``load_rows`` to
read your own data (a database, a CSV file, ...): it must return a 2-D
float32 or float64 array, the same number of columns on every node.
"""

import numpy as np

from skfedmm.flower import make_client_app


def load_rows(context):
    """This node's rows: the ``.npy`` file named by ``data-path``."""
    return np.load(context.node_config["data-path"], allow_pickle=False)


app = make_client_app(load_rows)
