"""Tests for runtime.rpc.pbwire against the generated protobuf classes: what it encodes
parses as the same message, and what protobuf encodes it reads back the same."""

from __future__ import annotations

import json

import pytest
from google.protobuf import any_pb2, timestamp_pb2

from protos.containerd.services.containers.v1 import containers_pb2
from protos.stasis.v1 import checkpoint_pb2
from runtime.cli.main import CheckpointRequest, set_image_request
from runtime.rpc.pbwire import Message, encode

U64_MAX = (1 << 64) - 1


@pytest.mark.parametrize(
    ("fields", "want"),
    [
        ({"id": "ctr"}, {}),
        (
            {
                "id": "ctr-é",
                "store": "s3://b/p",
                "name": "n",
                "exit": True,
                "tcp_established": True,
            },
            {"image": "docker.io/library/busybox:latest", "image_pending": True},
        ),
        ({"id": "", "store": "/var/lib/stasis/checkpoints"}, {"image_pending": False}),
    ],
)
def test_checkpoint_request_parses_as_protobufs(
    fields: dict[str, object], want: dict[str, object]
) -> None:
    req = CheckpointRequest(**fields)  # type: ignore[arg-type]
    for k, v in want.items():
        setattr(req, k, v)
    got = checkpoint_pb2.CheckpointRequest.FromString(req.encode())
    assert got == checkpoint_pb2.CheckpointRequest(**fields, **want)  # type: ignore[arg-type]
    # Defaults are left out, as protobuf leaves them out.
    assert req.encode() == checkpoint_pb2.CheckpointRequest(**fields, **want).SerializeToString()  # type: ignore[arg-type]


def test_set_image_request_parses_as_protobufs() -> None:
    for kw in ({"image": "img:1"}, {"error": "lookup failed: x", "abort": True}, {}):
        got = checkpoint_pb2.SetImageRequest.FromString(set_image_request("c1", **kw))  # type: ignore[arg-type]
        assert got == checkpoint_pb2.SetImageRequest(id="c1", **kw)  # type: ignore[arg-type]


def test_checkpoint_response_reads_as_protobuf_wrote_it() -> None:
    resp = checkpoint_pb2.CheckpointResponse(
        ref="file:///var/lib/stasis/checkpoints/ü",
        name="ü",
        size=U64_MAX,
        criu_size=1 << 33,
        seconds=1.25,
        frozen_seconds=1e-9,
    )
    m = Message(resp.SerializeToString())
    assert (m.string(1), m.string(2), m.uint(3), m.uint(4)) == (resp.ref, "ü", U64_MAX, 1 << 33)
    assert (m.double(5), m.double(6)) == (1.25, 1e-9)
    empty = Message(checkpoint_pb2.CheckpointResponse().SerializeToString())
    assert (empty.string(1), empty.uint(3), empty.double(5), empty.boolean(9)) == (
        "",
        0,
        0.0,
        False,
    )


def test_container_reads_as_protobuf_wrote_it() -> None:
    """What runtime.rpc.containerd.get_container reads of containerd's answer, among the
    fields it skips (labels, extensions, timestamps, runtime options)."""
    spec = {"ociVersion": "1.1.0", "annotations": {"a": "b"}}
    c = containers_pb2.Container(
        id="ctr",
        labels={"k": "v", "k2": "v2"},
        image="docker.io/stasis/busybox:test",
        runtime=containers_pb2.Container.Runtime(
            name="io.containerd.stasis.v2",
            options=any_pb2.Any(type_url="x/opts", value=b"\x08\x01"),
        ),
        spec=any_pb2.Any(
            type_url="types.containerd.io/opencontainers/runtime-spec/1/Spec",
            value=json.dumps(spec).encode(),
        ),
        snapshotter="overlayfs",
        created_at=timestamp_pb2.Timestamp(seconds=1_700_000_000, nanos=5),
        extensions={"e": any_pb2.Any(type_url="t", value=b"v")},
        sandbox="sb",
    )
    raw = containers_pb2.GetContainerResponse(container=c).SerializeToString()
    got = Message(raw).message(1)
    assert (got.string(1), got.string(3), got.string(11)) == ("ctr", c.image, "sb")
    assert got.message(4).string(1) == "io.containerd.stasis.v2"
    assert json.loads(got.message(5).bytes(2)) == spec
    # An absent message reads as an empty one.
    assert Message(b"").message(1).string(1) == ""


def test_unknown_fields_are_skipped_and_the_last_scalar_wins() -> None:
    fixed32 = bytes([9 << 3 | 5]) + b"\x01\x02\x03\x04"
    fixed64 = bytes([10 << 3 | 1]) + b"\x00" * 8
    raw = encode([(1, "old")]) + fixed32 + fixed64 + encode([(1, "new"), (20, 300)])
    m = Message(raw)
    assert (m.string(1), m.uint(20)) == ("new", 300)


def test_a_repeated_nested_message_merges() -> None:
    raw = encode([(4, encode([(1, "name")])), (4, encode([(2, b"opts")]))])
    m = Message(raw).message(4)
    assert (m.string(1), m.bytes(2)) == ("name", b"opts")


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (b"\x08", "truncated varint"),
        (b"\x08" + b"\xff" * 10 + b"\x01", "longer than 10 bytes"),
        (b"\x0a\x05ab", "5 bytes announced, 2 left"),
        (b"\x0d\x01\x02", "truncated fixed-width"),
        (b"\x0b", "unsupported wire type 3"),
        (b"\x00\x01", "field number 0"),
    ],
)
def test_malformed_input_is_named(raw: bytes, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Message(raw)


def test_a_field_of_the_wrong_type_is_named() -> None:
    m = Message(encode([(1, 5), (2, "s"), (3, b"\xff")]))
    with pytest.raises(ValueError, match="field 1: wrong wire type for a bytes field"):
        m.string(1)
    with pytest.raises(ValueError, match="field 2: wrong wire type for a int field"):
        m.uint(2)
    with pytest.raises(ValueError, match="field 3: not UTF-8"):
        m.string(3)
    with pytest.raises(ValueError, match="field 2: a double takes 8 bytes, not 1"):
        m.double(2)
    with pytest.raises(ValueError, match="field 1: wrong wire type for a message field"):
        m.message(1)


def test_encode_refuses_what_it_cannot_write() -> None:
    with pytest.raises(ValueError, match="field 3: -1 is negative"):
        encode([(3, -1)])
    with pytest.raises(TypeError, match="field 2: cannot encode list"):
        encode([(2, [1])])  # type: ignore[list-item]
    assert encode([(1, None), (2, ""), (3, b""), (4, False), (5, 0), (6, 0.0)]) == b""


def test_ttrpc_envelopes_match_protobufs() -> None:
    """The ttrpc clients' Request and Response, as runtime.rpc.ttrpc_wire writes and reads them."""
    from protos.ttrpc import request_pb2, status_pb2
    from runtime.rpc.ttrpc_wire import decode_response, encode_request

    data = encode_request(
        "stasis.v1.Checkpointer", "Checkpoint", b"\x0a\x01x", 2.5, {"k": "v", "e": ""}, 1 << 20
    )
    assert request_pb2.Request.FromString(data) == request_pb2.Request(
        service="stasis.v1.Checkpointer",
        method="Checkpoint",
        payload=b"\x0a\x01x",
        timeout_nano=2_500_000_000,
        metadata=[request_pb2.KeyValue(key="k", value="v"), request_pb2.KeyValue(key="e")],
    )
    bare = encode_request("s", "m", b"", None, None, 1 << 20)
    assert bare == request_pb2.Request(service="s", method="m").SerializeToString()

    status = status_pb2.Status(code=5, message="container x: not found")
    status.details.add(type_url="t", value=b"d")
    raw = request_pb2.Response(status=status, payload=b"answer").SerializeToString()
    assert decode_response(raw) == (5, "container x: not found", b"answer")
    raw = request_pb2.Response(status=status_pb2.Status(code=-3)).SerializeToString()
    assert decode_response(raw) == (-3, "", b"")
    assert decode_response(b"") == (0, "", b"")
    with pytest.raises(ValueError):
        decode_response(b"\x12\x09short")
