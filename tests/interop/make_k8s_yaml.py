"""Jina's own Kubernetes export of a Flow whose executor is the clipft image, as a user writes it:
`Flow().add(uses='docker://clipft:cpu', uses_with={'name': MODEL}).to_kubernetes_yaml(OUT)`.
Jina then asks its hub about the image; that fails offline (the test points the proxy at a closed
loopback port), after the executor's YAML is written, which is all the test needs.
argv: OUT MODEL"""
import os
import sys

from jina import Flow

out, model = sys.argv[1:3]
try:
    Flow().add(uses='docker://clipft:cpu', uses_with={'name': model}, name='clip_t').to_kubernetes_yaml(
        out, k8s_namespace='clipft'
    )
except Exception as e:  # the hub lookup after the executor's YAML
    print(f'to_kubernetes_yaml stopped: {type(e).__name__}', file=sys.stderr)
path = os.path.join(out, 'clip_t', 'clip-t.yml')
assert os.path.isfile(path), os.listdir(out)
print(path)
