"""The demo's encoding display: a node's progress callback -> its /metrics -> the launcher's console line."""

from __future__ import annotations

from deploy.local_federation import EncodingDisplay, scrape_encode_counts
from hospital_node.client import encode_progress_metrics
from shared.data.features import EncodeProgress
from shared.ops.telemetry import Telemetry, serve_metrics


def test_the_launcher_reads_each_nodes_encoding_from_its_metrics():
    telemetry = Telemetry("hospital_node")
    server, port = serve_metrics(telemetry, 0)
    try:
        view = EncodingDisplay({"hospital_1": port})
        view.poll()
        assert "hospital_1 loading" in view.line() and not view.ready  # serving, not encoding yet
        update = encode_progress_metrics(telemetry)
        update(EncodeProgress(n_images=200, n_cached=40, n_encoded=0))
        update(EncodeProgress(n_images=200, n_cached=40, n_encoded=64))
        view.poll()
        counts = scrape_encode_counts(port)
        assert (counts.encoded, counts.cached, counts.pending) == (64, 40, 96)
        assert "hospital_1 64/160" in view.line() and not view.ready
        update(EncodeProgress(n_images=200, n_cached=40, n_encoded=160))
        view.poll()
        assert view.ready
        assert "hospital_1 ready (160 encoded, 40 cached)" in view.summary(12.0)
    finally:
        server.shutdown()
        server.server_close()
    assert scrape_encode_counts(port, timeout_s=0.5) is None  # a node not serving (yet) is "starting"
