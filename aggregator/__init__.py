"""The FedMedCLIP aggregator service: round state machine, checkpoints, gRPC servicer."""
