"""clip_client against `clipft executor`, unchanged: encode (texts, image files, Documents with
blob and tensor, sync and async), rank and profile. Expected embeddings come from `clipft encode`
on the same model (argv[2], JSON Lines)."""
import asyncio
import json
import sys

import numpy as np
from clip_client import Client
from docarray import Document, DocumentArray
from PIL import Image

port, expected_path = sys.argv[1], sys.argv[2]
expected = [json.loads(line) for line in open(expected_path)]
texts = [e['text'] for e in expected if 'text' in e]
images = [e['image'] for e in expected if 'image' in e]
want_t = np.array([e['embedding'] for e in expected if 'text' in e], dtype=np.float32)
want_i = np.array([e['embedding'] for e in expected if 'image' in e], dtype=np.float32)


def close(got, want, what):
    got = np.asarray(got)
    assert got.dtype == np.float32, f'{what}: dtype {got.dtype}'
    assert got.shape == want.shape, f'{what}: shape {got.shape} != {want.shape}'
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=what)


c = Client(f'grpc://127.0.0.1:{port}')

# Raw strings: texts, and image paths (the client loads them to blob).
close(c.encode(texts, batch_size=3), want_t, 'texts')
close(c.encode(images, batch_size=2), want_i, 'image files')
mixed = c.encode([texts[0], images[0], texts[1]])
close(mixed, np.stack([want_t[0], want_i[0], want_t[1]]), 'mixed')

# Documents: blob, tensor (uint8 HWC of the same PNG) and text with tags.
pixels = np.asarray(Image.open(images[0]).convert('RGB'))
da = DocumentArray(
    [
        Document(uri=images[0]).load_uri_to_blob(),
        Document(tensor=pixels),
        Document(text=texts[0], tags={'k': 'v', 'n': 2}),
    ]
)
r = c.encode(da)
assert isinstance(r, DocumentArray) and len(r) == 3
close(r[0].embedding, want_i[0], 'blob document')
close(r[1].embedding, want_i[0], 'tensor document')
close(r[2].embedding, want_t[0], 'text document')
assert r[2].tags == {'k': 'v', 'n': 2}, r[2].tags

# With a parameter the server must read.
close(c.encode(texts, parameters={'minibatch_size': 2}), want_t, 'minibatch_size parameter')


async def async_encode():
    return await c.aencode(texts, batch_size=2)


close(asyncio.run(async_encode()), want_t, 'aencode')

# rank: clip_score (softmax at logit scale 100) and clip_score_cosine, matches sorted.
q = Document(
    text=texts[0],
    matches=[
        Document(text=texts[1]),
        Document(text=texts[0]),
        Document(uri=images[0]).load_uri_to_blob(),
    ],
)
ranked = c.rank([q])
m = ranked[0].matches
assert len(m) == 3
assert m[0].text == texts[0], [x.text for x in m]
scores = [x.scores['clip_score'].value for x in m]
assert scores == sorted(scores, reverse=True), scores
assert abs(sum(scores) - 1) < 1e-5, scores
assert all(x.scores['clip_score'].op_name == 'softmax' for x in m)
assert all(x.scores['clip_score_cosine'].op_name == 'cosine' for x in m)
assert abs(m[0].scores['clip_score_cosine'].value - 1) < 1e-5
cos = np.array([x.scores['clip_score_cosine'].value for x in m], dtype=np.float64)
soft = np.exp(np.exp(4.60517) * (cos - cos.max()))
np.testing.assert_allclose(scores, soft / soft.sum(), rtol=1e-4, atol=1e-6)

# profile reads the gateway and executor routes' timestamps.
c.profile(images[-1])
# Its default request is one empty document, answered in microseconds: the routes' times (read
# in whole milliseconds) must not be zero, or profile() divides by zero.
for _ in range(20):
    report = c.profile()
    assert report['Server'] >= 1 and report['CLIP model'] >= 1, report

# Keepalive pings as Jina's channels send them (every ~10 s; here every second, idle included)
# are accepted: the channel stays usable after several pings.
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

channel = grpc.insecure_channel(
    f'127.0.0.1:{port}',
    options=[
        ('grpc.keepalive_time_ms', 1000),
        ('grpc.keepalive_timeout_ms', 4999),
        ('grpc.keepalive_permit_without_calls', 1),
        ('grpc.http2.max_pings_without_data', 0),
    ],
)
stub = health_pb2_grpc.HealthStub(channel)
assert stub.Check(health_pb2.HealthCheckRequest(service='')).status == health_pb2.HealthCheckResponse.SERVING
time.sleep(4)
assert stub.Check(health_pb2.HealthCheckRequest(service='')).status == health_pb2.HealthCheckResponse.SERVING
channel.close()

print('clip_client interop ok')
