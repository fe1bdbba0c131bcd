"""A real Jina gateway in front of three clipft executors given as the replicas of one Deployment
(the addresses a gateway's --deployments-addresses lists): every request is answered with an
embedding; the Rust side then reads each executor's metrics to see that all three served.
argv: PORT1 PORT2 PORT3 REQUESTS"""
import sys

from docarray import Document, DocumentArray
from jina import Client, Flow

ports = [int(p) for p in sys.argv[1:4]]
requests = int(sys.argv[4])

f = Flow().add(host='127.0.0.1', port=ports, external=True, name='clip_t')
with f:
    client = Client(port=f.port)
    for i in range(requests):
        got = client.post('/encode', DocumentArray([Document(text=f'a photo of garment {i}')]))
        assert got[0].embedding is not None and got[0].embedding.shape == (32,), got[0].embedding
print('replicas ok')
