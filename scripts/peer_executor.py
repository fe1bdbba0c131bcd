#!/usr/bin/env python3
"""The Python peer that `clipft executor` is benchmarked against: a Jina Flow serving Hugging Face
transformers CLIP the way clip_server's torch executor serves CLIP today.

    python scripts/peer_executor.py --model DIR --port 51000 [--select-model all|clip-text|clip-vision]
        [--device auto|cpu|cuda] [--dtype auto|fp32|fp16]

starts `Flow(port=PORT).add(uses=CLIPEncoder, name='clip_t')` and blocks until SIGTERM or Ctrl-C;
clip_client talks to the Flow's gRPC gateway on PORT exactly as it talks to clip_server. A line
`peer serving on 127.0.0.1:PORT` goes to stdout once the Flow is ready. Jina runs the executor in
a process of its own (forked from this one, and torch / transformers are imported only there), so
its memory can be measured apart from the gateway's: when CLIP_PEER_PID_FILE is set, the executor
writes its process id to that file as soon as it starts.

What CLIPEncoder does (the behaviour of clip_server's torch executor, on a local Hugging Face
CLIP folder instead of open_clip weights):
  * init: model_path, minibatch_size=32, num_worker_preprocess=4, access_paths='@r',
    select_model='all' (CLIPModel) | 'clip-text' (CLIPTextModelWithProjection only) |
    'clip-vision' (CLIPVisionModelWithProjection only), device='auto' (cuda if torch sees a GPU,
    else cpu), dtype='auto' (fp32 on the CPU, fp16 on CUDA: clip_server's defaults); eval mode;
    torch uses every core (divided by the replica count) and one inter-op thread, unless
    OMP_NUM_THREADS is set.
  * the bare `@requests` endpoint (so /encode, which clip_client posts to, and /default) embeds the
    documents at `parameters['access_paths']` (default: the init value): a document with non-empty
    text is a text; one with a blob, a tensor or a uri is an image. Each modality is cut into
    minibatches of minibatch_size, preprocessed in a thread pool of num_worker_preprocess threads
    (one minibatch per task, the way DocumentArray.map_batch(pool=...) does) while the model runs
    the minibatches in order under torch.inference_mode():
      texts:  CLIPTokenizer, padding='max_length', max_length=77, truncation -> get_text_features
      images: blob (or uri loaded to blob, or uint8 tensor) -> PIL RGB -> CLIPImageProcessor with
              the PIL backend (resize the short side to 224 bicubic, centre crop, normalise)
              -> get_image_features
    Embeddings are set as float32 numpy arrays, not normalised. With
    parameters['drop_image_content'] (default False; clip_client sends True) an image document's
    blob and tensor are removed after preprocessing (its uri is kept).
  * /rank is not implemented (the benchmark does not use it).

Needs jina 3 with docarray 0.21, torch and transformers (scripts/requirements-peer.txt).
"""

import argparse
import io
import os
import signal
import sys
import time
from multiprocessing.pool import ThreadPool

# Keep Jina quiet and offline before it is imported.
os.environ.setdefault('JINA_OPTOUT_TELEMETRY', '1')
os.environ.setdefault('JINA_HIDE_SURVEY', '1')

import numpy as np  # noqa: E402
from jina import Executor, Flow, requests  # noqa: E402

TEXT_LENGTH = 77
SELECT_MODELS = ('all', 'clip-text', 'clip-vision')


def _features(out):
    """transformers 5 returns a model output (features in pooler_output), 4 a tensor."""
    return out.pooler_output if hasattr(out, 'pooler_output') else out


class CLIPEncoder(Executor):
    def __init__(
        self,
        model_path: str,
        minibatch_size: int = 32,
        num_worker_preprocess: int = 4,
        access_paths: str = '@r',
        select_model: str = 'all',
        device: str = 'auto',
        dtype: str = 'auto',
        **kwargs,
    ):
        super().__init__(**kwargs)
        pid_file = os.environ.get('CLIP_PEER_PID_FILE')
        if pid_file:
            with open(pid_file, 'w') as f:
                f.write(str(os.getpid()))
        if select_model not in SELECT_MODELS:
            raise ValueError(f'select_model must be one of {SELECT_MODELS}, not {select_model!r}')

        # torch and transformers live in the executor process only.
        import torch
        import transformers

        self._torch = torch
        if 'OMP_NUM_THREADS' not in os.environ:
            replicas = getattr(self.runtime_args, 'replicas', 1) or 1
            torch.set_num_threads(max(1, torch.get_num_threads() // replicas))
            try:
                torch.set_num_interop_threads(1)
            except RuntimeError:  # already set in this process
                pass

        self._minibatch_size = minibatch_size
        self._access_paths = access_paths
        self._select_model = select_model
        self._pool = ThreadPool(processes=num_worker_preprocess)

        if device == 'auto':
            device = 'cuda' if torch.cuda.is_available() else 'cpu'
        if dtype == 'auto':
            dtype = 'fp32' if device == 'cpu' else 'fp16'
        if dtype not in ('fp32', 'fp16'):
            raise ValueError(f"dtype must be auto, fp32 or fp16, not {dtype!r}")
        self._device = torch.device(device)
        self._dtype = torch.float32 if dtype == 'fp32' else torch.float16
        load = dict(dtype=self._dtype)
        self._text_model = self._vision_model = self._model = None
        if select_model == 'all':
            self._model = transformers.CLIPModel.from_pretrained(model_path, **load).eval().to(self._device)
        elif select_model == 'clip-text':
            model = transformers.CLIPTextModelWithProjection.from_pretrained(model_path, **load)
            self._text_model = model.eval().to(self._device)
        else:
            model = transformers.CLIPVisionModelWithProjection.from_pretrained(model_path, **load)
            self._vision_model = model.eval().to(self._device)

        self._tokenizer = None
        self._image_processor = None
        if select_model in ('all', 'clip-text'):
            self._tokenizer = transformers.CLIPTokenizer.from_pretrained(model_path)
        if select_model in ('all', 'clip-vision'):
            # transformers 5: CLIPImageProcessor is the torchvision backend, CLIPImageProcessorPil the
            # PIL one; transformers 4: CLIPImageProcessor is the PIL one.
            processor = getattr(transformers, 'CLIPImageProcessorPil', None) or transformers.CLIPImageProcessor
            self._image_processor = processor.from_pretrained(model_path)

    # Preprocessing: runs in the thread pool, one minibatch (a list of Documents) per call.

    def _preprocess_texts(self, batch):
        tokens = self._tokenizer(
            [d.text for d in batch],
            padding='max_length',
            max_length=TEXT_LENGTH,
            truncation=True,
            return_tensors='pt',
        )
        return batch, {'input_ids': tokens['input_ids'], 'attention_mask': tokens['attention_mask']}

    def _preprocess_images(self, batch, drop_image_content):
        from PIL import Image

        images = []
        for d in batch:
            if d.blob:
                image = Image.open(io.BytesIO(d.blob))
            elif d.tensor is not None:
                image = Image.fromarray(np.asarray(d.tensor).astype(np.uint8))
            else:
                d.load_uri_to_blob()
                image = Image.open(io.BytesIO(d.blob))
            images.append(image.convert('RGB'))
            if drop_image_content:
                d.pop('blob', 'tensor')
        pixels = self._image_processor(images=images, return_tensors='pt')['pixel_values']
        return batch, {'pixel_values': pixels}

    # The model: runs in the request thread, minibatch after minibatch.

    def _embed_texts(self, inputs):
        inputs = {k: v.to(self._device) for k, v in inputs.items()}
        if self._model is not None:
            return _features(self._model.get_text_features(**inputs))
        return self._text_model(**inputs).text_embeds

    def _embed_images(self, inputs):
        inputs = {'pixel_values': inputs['pixel_values'].to(self._device, self._dtype)}
        if self._model is not None:
            return _features(self._model.get_image_features(**inputs))
        return self._vision_model(**inputs).image_embeds

    def _run(self, docs, preprocess, embed):
        size = self._minibatch_size
        batches = [docs[i : i + size] for i in range(0, len(docs), size)]
        with self._torch.inference_mode():
            for batch, inputs in self._pool.imap(preprocess, batches):
                features = embed(inputs).float().cpu().numpy()
                for d, e in zip(batch, features):
                    d.embedding = e

    @requests
    def encode(self, docs, parameters=None, **kwargs):
        parameters = parameters or {}
        access_paths = parameters.get('access_paths', self._access_paths)
        drop_image_content = bool(parameters.get('drop_image_content', False))

        texts, images = [], []
        for d in docs[access_paths]:
            if d.text:
                texts.append(d)
            elif d.blob or d.tensor is not None or d.uri:
                images.append(d)
        # A one-tower executor passes the other modality through untouched.
        if texts and self._tokenizer is not None:
            self._run(texts, self._preprocess_texts, self._embed_texts)
        if images and self._image_processor is not None:
            self._run(
                images,
                lambda batch: self._preprocess_images(batch, drop_image_content),
                self._embed_images,
            )
        return docs

    def close(self):
        self._pool.close()
        super().close()


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--model', required=True, help='local Hugging Face CLIP folder')
    p.add_argument('--port', type=int, default=51000)
    p.add_argument('--select-model', choices=SELECT_MODELS, default='all')
    p.add_argument('--minibatch-size', type=int, default=32)
    p.add_argument('--num-worker-preprocess', type=int, default=4)
    p.add_argument('--access-paths', default='@r')
    p.add_argument('--device', default='auto', help='auto (cuda if torch sees a GPU), cpu or cuda[:N]')
    p.add_argument('--dtype', choices=('auto', 'fp32', 'fp16'), default='auto', help='auto: fp32 on the CPU, fp16 on CUDA')
    args = p.parse_args()

    flow = Flow(port=args.port).add(
        uses=CLIPEncoder,
        uses_with=dict(
            model_path=os.path.abspath(args.model),
            minibatch_size=args.minibatch_size,
            num_worker_preprocess=args.num_worker_preprocess,
            access_paths=args.access_paths,
            select_model=args.select_model,
            device=args.device,
            dtype=args.dtype,
        ),
        name='clip_t',
    )
    # SIGTERM stops the Flow the way Ctrl-C does.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    start = time.perf_counter()
    with flow:
        print(f'peer serving on 127.0.0.1:{args.port} ({time.perf_counter() - start:.1f} s)', flush=True)
        try:
            flow.block()
        except KeyboardInterrupt:
            pass


if __name__ == '__main__':
    sys.exit(main())
