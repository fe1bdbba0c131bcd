"""Datasets on their way to the trainer: a DocumentArray is written as a docarray v1 protobuf
stream (what ``save_binary(protocol='protobuf', compress=None)`` writes), one document at a time,
with relative local image paths made absolute so the packer finds them (it inlines local images
as blobs before the push). The user's documents are not changed."""

import os
import struct
from typing import Any, Iterable

_SCHEMES = ("data:", "http://", "https://")


def is_documents(data: Any) -> bool:
    """A docarray v1 DocumentArray, or a list of Documents."""
    try:
        from docarray import Document, DocumentArray
    except ImportError:  # pragma: no cover - docarray is a dependency
        return False
    if isinstance(data, DocumentArray):
        return True
    return isinstance(data, (list, tuple)) and len(data) > 0 and all(
        isinstance(d, Document) for d in data
    )


def _absolute_uris(pb) -> None:
    """Relative local paths in ``pb`` and its chunks become absolute (against the current
    folder, where the user's code meant them)."""
    if pb.uri and not pb.uri.lower().startswith(_SCHEMES) and "://" not in pb.uri:
        if not os.path.isabs(pb.uri):
            pb.uri = os.path.abspath(pb.uri)
    for c in pb.chunks:
        _absolute_uris(c)


def write_docarray(docs: Iterable, path: str) -> int:
    """Writes ``docs`` to ``path`` as a docarray v1 protobuf stream; returns how many."""
    n = 0
    with open(path, "wb") as f:
        f.write(b"\x01")
        f.write(struct.pack(">Q", 0))
        for d in docs:
            pb = d.to_protobuf()
            _absolute_uris(pb)
            raw = pb.SerializeToString()
            f.write(struct.pack(">I", len(raw)))
            f.write(raw)
            n += 1
        f.seek(1)
        f.write(struct.pack(">Q", n))
    return n


def image_item(doc, where: str):
    """The image of one Document as the native encoder takes it: its tensor, blob or uri."""
    import numpy as np

    if doc.tensor is not None:
        t = np.ascontiguousarray(doc.tensor)
        return ("tensor", t.tobytes(), list(t.shape), t.dtype.str)
    if doc.blob:
        return ("blob", bytes(doc.blob))
    if doc.uri:
        return ("uri", doc.uri)
    raise ValueError(
        f"{where} has no image (tensor, blob or uri) for clip-vision"
        + (f"; it has text {doc.text[:40]!r}: encode it with clip-text" if doc.text else "")
    )


def text_item(doc, where: str) -> str:
    """The text of one Document for the text tower."""
    if doc.text:
        return doc.text
    kind = "an image" if (doc.tensor is not None or doc.blob or doc.uri) else "no content"
    raise ValueError(f"{where} has no text for clip-text (it has {kind})")
