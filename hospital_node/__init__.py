"""The FedMedCLIP hospital-node daemon: local data, feature cache, client loop, private state, predict."""
