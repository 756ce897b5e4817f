"""FedMedCLIP shared library: the learning core and the code both services use.

The learning core (backbone, data, features, model, objective, training, codec,
aggregation, simulation) never imports gRPC.
"""

__version__ = "0.1.0"
