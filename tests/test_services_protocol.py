"""The generated protocol code is current, and the protocol follows buf's STANDARD naming."""

from __future__ import annotations

from shared.wire.proto.fedmedclip.v1 import aggregator_service_pb2 as pb
from shared.wire.protogen import PACKAGE_DIR, REPO_ROOT, generate


def test_generated_code_is_byte_identical_to_a_fresh_protoc_run(tmp_path):
    fresh = generate(tmp_path)
    assert fresh, "protoc generated nothing"
    generated = REPO_ROOT / PACKAGE_DIR
    committed = sorted([*generated.rglob("*_pb2*.py*"), *generated.rglob("*.proto")])
    rel = lambda paths, base: sorted(p.relative_to(base).as_posix() for p in paths)  # noqa: E731
    assert "fedmedclip/v1/aggregator_service.proto" in rel(committed, generated)  # the package ships its .proto
    assert rel(fresh, tmp_path / PACKAGE_DIR) == rel(committed, generated)
    for new in fresh:
        old = generated / new.relative_to(tmp_path / PACKAGE_DIR)
        assert new.read_bytes() == old.read_bytes(), f"{old} is stale: run `make protos`"


def test_protocol_follows_buf_standard_naming():
    fd = pb.DESCRIPTOR
    assert fd.package == "fedmedclip.v1"
    for service in fd.services_by_name.values():
        assert service.name.endswith("Service")
        inputs = set()
        for method in service.methods:
            assert method.input_type.name == f"{method.name}Request"
            assert method.output_type.name == f"{method.name}Response"
            inputs.add(method.input_type.name)
        assert len(inputs) == len(service.methods)  # one request per RPC
    for enum in fd.enum_types_by_name.values():
        zero = enum.values_by_number[0].name
        prefix = "".join(f"_{c}" if c.isupper() else c.upper() for c in enum.name).lstrip("_")
        assert zero == f"{prefix}_UNSPECIFIED"
        assert all(v.name.startswith(prefix + "_") for v in enum.values)
    for name in ("FetchGlobalResponse", "UploadUpdateRequest"):
        assert [o.name for o in fd.message_types_by_name[name].oneofs] == ["content"]
