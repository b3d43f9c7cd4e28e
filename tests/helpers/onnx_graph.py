"""ONNX export without the ``onnx`` package: the node types of an exported model, read from its
protobuf bytes.

torch.onnx's TorchScript-based exporter builds and serialises the model itself, and only needs
``onnx`` for a last pass that inserts onnx-script functions (none here). Without ``onnx``,
:func:`export_bytes` skips that pass; :func:`node_types` reads the ModelProto wire format
(onnx/onnx.proto: ModelProto.graph = 7, GraphProto.node = 1, NodeProto.op_type = 4).
"""

from __future__ import annotations

import importlib.util
import io
from collections.abc import Iterator

import torch

HAS_ONNX = importlib.util.find_spec("onnx") is not None
MODEL_GRAPH, GRAPH_NODE, NODE_OP_TYPE = 7, 1, 4


def export_bytes(model: torch.nn.Module, x: torch.Tensor, monkeypatch, **options) -> bytes:
    """``torch.onnx.export(model, (x,), dynamo=False, **options)``'s file contents."""
    if not HAS_ONNX:
        from torch.onnx._internal.torchscript_exporter import onnx_proto_utils

        monkeypatch.setattr(onnx_proto_utils, "_add_onnxscript_fn", lambda proto, opsets: proto)
    buffer = io.BytesIO()
    torch.onnx.export(model, (x,), buffer, dynamo=False, **options)
    return buffer.getvalue()


def node_types(model_bytes: bytes) -> list[str]:
    """The op type of every node of the model's main graph, in order."""
    graph = next(value for number, value in _fields(model_bytes) if number == MODEL_GRAPH)
    nodes = (value for number, value in _fields(graph) if number == GRAPH_NODE)
    return [dict(_fields(node))[NODE_OP_TYPE].decode() for node in nodes]


def _fields(message: bytes) -> Iterator[tuple[int, int | bytes]]:
    """(field number, value) of each field of a protobuf message, in order."""
    position = 0
    while position < len(message):
        key, position = _varint(message, position)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, position = _varint(message, position)
        elif wire_type in (1, 5):  # fixed64, fixed32
            width = 8 if wire_type == 1 else 4
            value, position = message[position : position + width], position + width
        elif wire_type == 2:  # length-delimited
            length, position = _varint(message, position)
            value, position = message[position : position + length], position + length
        else:
            raise ValueError(f"unexpected protobuf wire type {wire_type}")
        yield number, value


def _varint(message: bytes, position: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = message[position]
        position += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, position
