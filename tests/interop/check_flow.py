"""Jina Flows with `clipft executor` as external executors: a clipft executor followed by a
Python executor, driven by jina.Client.post, every document field checked on the way back; and
a Flow chaining a clip-text executor and a clip-vision executor.
argv: PORT_ALL PORT_TEXT PORT_VISION EXPECTED_JSONL"""
import json
import sys

import numpy as np
from docarray import Document, DocumentArray
from jina import Client, Executor, Flow, requests
from PIL import Image

port_all, port_text, port_vision, expected_path = sys.argv[1:5]
expected = [json.loads(line) for line in open(expected_path)]
texts = [e['text'] for e in expected if 'text' in e]
images = [e['image'] for e in expected if 'image' in e]
want_t = np.array([e['embedding'] for e in expected if 'text' in e], dtype=np.float32)
want_i = np.array([e['embedding'] for e in expected if 'image' in e], dtype=np.float32)


def close(got, want, what):
    assert got is not None, f'{what}: no embedding'
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5, err_msg=what)


class Checker(Executor):
    """Runs after clipft in the Flow: sees the embeddings and marks the documents."""

    @requests
    def check(self, docs, **kwargs):
        for d in docs:
            d.tags['checked_by'] = 'python'
            d.tags['dim'] = -1 if d.embedding is None else int(d.embedding.shape[0])


def sent_docs():
    text = Document(
        id='t1',
        text=texts[0],
        tags={'finetuner_label': 'dress', 'n': 1},
        weight=0.5,
        mime_type='text/plain',
        chunks=[Document(id='t1c', text='a chunk')],
        matches=[Document(id='t1m', text='a match')],
    )
    text.scores['relevance'].value = 0.25
    text.scores['relevance'].op_name = 'manual'
    image = Document(id='i1', uri=images[0]).load_uri_to_blob()
    tensor = Document(id='x1', tensor=np.asarray(Image.open(images[0]).convert('RGB')), tags={'kind': 'tensor'})
    return DocumentArray([text, image, tensor])


errors = []
f = Flow().add(host='127.0.0.1', port=int(port_all), external=True, name='clip').add(uses=Checker, name='checker')
with f:
    client = Client(port=f.port)
    sent = sent_docs()
    got = client.post('/encode', sent_docs(), parameters={'drop_image_content': True})
    assert [d.id for d in got] == ['t1', 'i1', 'x1'], [d.id for d in got]
    t, i, x = got['t1'], got['i1'], got['x1']
    close(t.embedding, want_t[0], 'text through the Flow')
    close(i.embedding, want_i[0], 'blob through the Flow')
    close(x.embedding, want_i[0], 'tensor through the Flow')
    assert t.tags['checked_by'] == 'python' and t.tags['dim'] == want_t.shape[1], t.tags
    assert t.tags['finetuner_label'] == 'dress' and t.tags['n'] == 1, t.tags
    assert t.weight == 0.5 and t.mime_type == 'text/plain', (t.weight, t.mime_type)
    assert [c.text for c in t.chunks] == ['a chunk'] and [m.text for m in t.matches] == ['a match']
    assert t.chunks[0].embedding is None and t.matches[0].embedding is None
    assert t.scores['relevance'].value == 0.25 and t.scores['relevance'].op_name == 'manual'
    assert i.uri == images[0] and i.mime_type == sent['i1'].mime_type, (i.uri, i.mime_type)
    assert not i.blob, 'drop_image_content drops the blob'
    assert x.tensor is None and x.tags['kind'] == 'tensor'

    # Without drop_image_content the image content comes back; per-executor parameters reach
    # only the named executor (`clip__access_paths`).
    got = client.post('/encode', sent_docs(), parameters={'clip__access_paths': '@c'})
    assert got['i1'].blob == sent['i1'].blob
    assert got['t1'].embedding is None and got['i1'].embedding is None
    assert got['t1'].chunks[0].embedding is not None and got['t1'].chunks[0].embedding.shape == want_t[0].shape
    assert got['t1'].tags['dim'] == -1

    # clip_server's catch-all: any endpoint encodes.
    got = client.post('/search', DocumentArray([Document(text=texts[1])]))
    close(got[0].embedding, want_t[1], '/search falls into the catch-all')

    # A bad document comes back as an error naming it; the Flow keeps serving.
    def on_error(resp):
        errors.append(resp.header.status)

    client.post('/encode', DocumentArray([Document(id='bad', blob=b'not an image')]), on_error=on_error)
    assert len(errors) == 1, errors
    assert 'BadDocumentError' in str(errors[0]) and 'bad' in str(errors[0]), errors[0]
    got = client.post('/encode', DocumentArray([Document(text=texts[1])]))
    close(got[0].embedding, want_t[1], 'after an error')
    assert client.is_flow_ready()

# A clip-text executor and a clip-vision executor chained.
f = Flow().add(host='127.0.0.1', port=int(port_text), external=True, name='text').add(
    host='127.0.0.1', port=int(port_vision), external=True, name='vision'
)
with f:
    docs = DocumentArray([Document(id='a', text=texts[0]), Document(id='b', uri=images[0]).load_uri_to_blob(), Document(id='c', text=texts[1])])
    got = Client(port=f.port).post('/encode', docs)
    close(got['a'].embedding, want_t[0], 'text executor')
    close(got['c'].embedding, want_t[1], 'text executor')
    close(got['b'].embedding, want_i[0], 'vision executor')
    assert got['b'].blob == docs['b'].blob

print('flow interop ok')
