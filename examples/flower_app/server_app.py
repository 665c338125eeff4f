"""
Flower ServerApp: fit any skfedmm estimator
===========================================

The ServerApp fits the skfedmm estimator named in the run configuration.

The estimator, its parameters and the output path come from
``[tool.flwr.app.config]`` (or ``flwr run --run-config``); see
:func:`skfedmm.flower.run_server`.
"""

from skfedmm.flower import make_server_app

app = make_server_app()
