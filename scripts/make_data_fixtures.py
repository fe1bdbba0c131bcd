#!/usr/bin/env python3
"""Make the committed training-data / evaluation fixtures under tests/fixtures/data/.

Run from the repository root with the docarray-v1 venv:

    python3.11 -m venv /work/venvs/da1
    /work/venvs/da1/bin/pip install "docarray[common]==0.21.1" "numpy==1.26.4" "protobuf>=4.21,<5"
    /work/venvs/da1/bin/python scripts/make_data_fixtures.py

Versions used for the committed files (also written into every JSON file under "generator"):
docarray 0.21.1, protobuf 4.25.9 (upb backend, so docarray uses its `proto/pb` module), numpy 1.26.4,
lz4 4.4.5, Pillow 13.0.0, CPython 3.11.7 (zlib/bz2/lzma from the interpreter).

Nothing is downloaded. Everything is deterministic: fixed ids, fixed seeds, and the gzip header
timestamp pinned (docarray writes `time.time()` into gzip headers; this script patches the `time`
module that `gzip` sees so the MTIME field is always GZIP_MTIME). Re-running rewrites identical
bytes (checked with sha256 in FORMAT.md's file table), given the same library versions.

What it writes into tests/fixtures/data/:

images/*.png                 tiny committed PNGs (RGB, L, RGBA; one name with a space and a comma,
                             one non-ASCII name), referenced by the CSVs and by `uri` chunks.
train.<protocol>.<compress>.bin
                             the same 6-pair CLIP training DocumentArray, written by docarray's own
                             DocumentArray.save_binary(path, protocol=P, compress=C) for
                             P in {protobuf-array, protobuf} x C in {none, lz4, gzip, zlib, bz2, lzma}.
query.protobuf-array.none.bin, index.protobuf-array.none.bin
                             an evaluation pair: text queries / image index docs with
                             tags['finetuner_label'].
expected_train.json          what docarray's load_binary reads back from each of those files.
malformed/*                  broken files + malformed/README.json saying what each is and what
                             docarray 0.21.1 does with it.
*.csv, expected_csv.json     Finetuner-style CSV datasets and the rows expected after Finetuner's
                             caption/image column detection (finetuner.md section 4).
metrics.json                 reference values of the nine docarray.math.evaluation functions.
eval_case.json               end-to-end evaluation (match + evaluate) computed with docarray's own
                             DocumentArray.match / DocumentArray.evaluate, as Finetuner's Evaluator did.
FORMAT.md                    the on-disk framing of every protocol/compression (written by this
                             script, with hex dumps taken from the files it just wrote).
"""

import base64
import contextlib
import csv
import gzip
import hashlib
import inspect
import io
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

import docarray
from docarray import Document, DocumentArray
from docarray.document.mixins.helper import _is_uri
from docarray.math import evaluation as da_eval
import google.protobuf
import lz4

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / 'tests' / 'fixtures' / 'data'
IMAGES = OUT / 'images'

GZIP_MTIME = 1_600_000_000  # pinned gzip MTIME (2020-09-13T12:26:40Z)
PROTOCOLS = ['protobuf-array', 'protobuf']
COMPRESSIONS = [None, 'lz4', 'gzip', 'zlib', 'bz2', 'lzma']

METRIC_NAMES = [
    name
    for name, fn in inspect.getmembers(da_eval, inspect.isfunction)
    if not name.startswith('_') and fn.__module__ == da_eval.__name__
]
assert METRIC_NAMES == [
    'average_precision', 'dcg_at_k', 'f1_score_at_k', 'hit_at_k', 'ndcg_at_k',
    'precision_at_k', 'r_precision', 'recall_at_k', 'reciprocal_rank',
], METRIC_NAMES


def generator_info():
    return {
        'script': 'scripts/make_data_fixtures.py',
        'python': platform.python_version(),
        'docarray': docarray.__version__,
        'protobuf': google.protobuf.__version__,
        'numpy': np.__version__,
        'lz4': lz4.__version__,
        'pillow': Image.__version__,
    }


def sha256(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def hexid(name: str) -> str:
    """A deterministic id shaped like docarray's default (32 lowercase hex chars)."""
    return hashlib.md5(name.encode()).hexdigest()


def write_json(path: Path, obj):
    path.write_text(json.dumps(obj, indent=1, ensure_ascii=False, allow_nan=False) + '\n', encoding='utf-8')


@contextlib.contextmanager
def pinned_gzip_time():
    """gzip.GzipFile / gzip.compress call time.time() for the header MTIME; pin it."""
    real = gzip.time

    class _T:
        @staticmethod
        def time():
            return float(GZIP_MTIME)

    gzip.time = _T
    try:
        yield
    finally:
        gzip.time = real


# --------------------------------------------------------------------------------------------
# images
# --------------------------------------------------------------------------------------------

def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format='PNG')
    return buf.getvalue()


def make_image(kind: str, w: int, h: int, mode: str = 'RGB') -> Image.Image:
    px = []
    for y in range(h):
        for x in range(w):
            if kind == 'solid_red':
                p = (220, 20, 60)
            elif kind == 'green_gradient':
                p = (x * 16 % 256, 100 + y * 16 % 156, 40)
            elif kind == 'blue_checker':
                p = (0, 0, 255) if (x + y) % 2 else (255, 255, 255)
            elif kind == 'gray':
                p = (x * 32 + y * 4) % 256
            elif kind == 'rgba':
                p = (255, 128, 0, (x * 32) % 256)
            elif kind == 'diag':
                p = (255, 140, 0) if x == y else (30, 30, 30)
            elif kind == 'stripes':
                p = (200, 0, 200) if y % 2 else (0, 200, 200)
            elif kind == 'noise':
                v = (x * 73 + y * 151 + 17) % 256
                p = (v, (v * 3) % 256, (v * 7) % 256)
            else:
                raise ValueError(kind)
            px.append(p)
    img = Image.new(mode, (w, h))
    img.putdata(px)
    return img


COMMITTED_IMAGES = {
    'red_8x8.png': ('solid_red', 8, 8, 'RGB'),
    'green_gradient_16x8.png': ('green_gradient', 16, 8, 'RGB'),
    'blue_checker_8x8.png': ('blue_checker', 8, 8, 'RGB'),
    'gray_8x8.png': ('gray', 8, 8, 'L'),
    'rgba_8x8.png': ('rgba', 8, 8, 'RGBA'),
    'with space, comma.png': ('stripes', 8, 8, 'RGB'),
    'café_8x8.png': ('noise', 8, 8, 'RGB'),
}


def write_images():
    IMAGES.mkdir(parents=True, exist_ok=True)
    for name, (kind, w, h, mode) in COMMITTED_IMAGES.items():
        (IMAGES / name).write_bytes(png_bytes(make_image(kind, w, h, mode)))


def data_uri(png: bytes) -> str:
    return 'data:image/png;base64,' + base64.b64encode(png).decode('ascii')


# --------------------------------------------------------------------------------------------
# the CLIP training DocumentArray
# --------------------------------------------------------------------------------------------

def tensor_4x4x3(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)


def build_train() -> DocumentArray:
    """6 parents, each with a text chunk and an image chunk (blob / uri / tensor / uri+blob / data URI)."""
    docs = []

    # 0: blob (generated 8x8 PNG, not a committed file), with an explicit mime_type
    docs.append(Document(
        id='pair-0',
        tags={'finetuner_label': 'red', 'split': 'train'},
        chunks=[
            Document(id='pair-0-text', text='a red square', modality='text'),
            Document(id='pair-0-image', blob=png_bytes(make_image('diag', 8, 8)),
                     mime_type='image/png', modality='image'),
        ],
    ))
    # 1: uri, relative to tests/fixtures/data/
    docs.append(Document(
        id=hexid('pair-1'),
        tags={'finetuner_label': 1, 'split': 'train'},
        chunks=[
            Document(id=hexid('pair-1-text'), text='Ein grünes Kleid – Größe M', modality='text'),
            Document(id=hexid('pair-1-image'), uri='images/green_gradient_16x8.png', modality='image'),
        ],
    ))
    # 2: tensor uint8 HWC 4x4x3
    docs.append(Document(
        id=hexid('pair-2'),
        tags={'finetuner_label': 2, 'split': 'train'},
        chunks=[
            Document(id=hexid('pair-2-text'), text='红色连衣裙 👗 (robe rouge)', modality='text'),
            Document(id=hexid('pair-2-image'), tensor=tensor_4x4x3(2), modality='image'),
        ],
    ))
    # 3: empty caption; uri + blob (what Finetuner's docs recommend: load_uri_to_blob keeps the uri)
    img3 = Document(id=hexid('pair-3-image'), uri='images/blue_checker_8x8.png', modality='image')
    with contextlib.chdir(OUT):
        img3.load_uri_to_blob()
    docs.append(Document(
        id=hexid('pair-3'),
        tags={'finetuner_label': 'blue', 'split': 'train'},
        chunks=[
            Document(id=hexid('pair-3-text'), text='', modality='text'),
            img3,
        ],
    ))
    # 4: tensor, tags on chunks too, nested/list/bool/null/float tag values on the parent
    docs.append(Document(
        id='pair-4',
        tags={'finetuner_label': 4, 'meta': {'source': 'synthetic', 'rank': 1.5},
              'flags': [True, None, 'x', 7]},
        chunks=[
            Document(id='pair-4-text', text='a gray square, with "quotes",\ttabs and a\nnewline',
                     modality='text', tags={'finetuner_label': 'gray', 'lang': 'en'}),
            Document(id='pair-4-image', tensor=tensor_4x4x3(4), modality='image',
                     tags={'finetuner_label': 'gray'}),
        ],
    ))
    # 5: image chunk FIRST, given as a data: URI; negative int label
    docs.append(Document(
        id=hexid('pair-5'),
        tags={'finetuner_label': -1, 'split': 'train'},
        chunks=[
            Document(id=hexid('pair-5-image'), uri=data_uri(png_bytes(make_image('rgba', 4, 4, 'RGBA'))),
                     modality='image'),
            Document(id=hexid('pair-5-text'), text='rgba square · ünïcode', modality='text'),
        ],
    ))
    return DocumentArray(docs)


def build_query_index():
    labels = ['red', 'green', 'blue', 'gray']
    queries = DocumentArray([
        Document(id=f'q{i}', text=t, modality='text', tags={'finetuner_label': lab})
        for i, (t, lab) in enumerate([
            ('a red thing', 'red'), ('something green', 'green'), ('blue checks', 'blue'),
            ('grey / gray', 'gray'), ('crimson square', 'red'),
        ])
    ])
    kinds = {'red': 'solid_red', 'green': 'green_gradient', 'blue': 'blue_checker', 'gray': 'noise'}
    index = []
    n = 0
    for lab in labels:
        for j in range(2):
            d = Document(id=f'i{n}', modality='image', tags={'finetuner_label': lab})
            if j == 0:
                d.blob = png_bytes(make_image(kinds[lab], 4 + n, 4))
            else:
                d.tensor = tensor_4x4x3(100 + n)
            index.append(d)
            n += 1
    # an extra index doc whose label no query has, given as a uri
    index.append(Document(id=f'i{n}', modality='image', uri='images/rgba_8x8.png',
                          tags={'finetuner_label': 'transparent'}))
    return queries, DocumentArray(index)


def doc_record(d: Document) -> dict:
    """What a reader must produce for one Document (recursive over chunks)."""
    pb = d.to_protobuf()
    content = pb.WhichOneof('content')
    rec = {
        'id': d.id,
        'text': d.text if content == 'text' else None,
        'modality': d.modality or None,
        'uri': d.uri or None,
        'mime_type': d.mime_type or None,
        'blob_sha256': sha256(d.blob) if content == 'blob' else None,
        'blob_len': len(d.blob) if content == 'blob' else None,
        'tensor': None,
        'parent_id': d.parent_id or None,
        'granularity': d.granularity,
        'tags': dict(d.tags),
        'chunks': [doc_record(c) for c in d.chunks],
    }
    if content == 'tensor':
        t = np.asarray(d.tensor)
        rec['tensor'] = {
            'cls_name': pb.tensor.cls_name,
            'dtype': pb.tensor.dense.dtype,
            'shape': list(t.shape),
            'values': t.reshape(-1).tolist(),
            'buffer_sha256': sha256(pb.tensor.dense.buffer),
        }
    return rec


def effective_compress(protocol, compress):
    """What docarray 0.21.1 really does (see FORMAT.md)."""
    if compress is None:
        return None
    if protocol == 'protobuf-array' and compress == 'zlib':
        return None  # get_compress_ctx() has no 'zlib' branch -> silently written uncompressed
    return compress


def write_train_files(train: DocumentArray):
    files = {}
    for protocol in PROTOCOLS:
        for compress in COMPRESSIONS:
            name = f'train.{protocol}.{compress or "none"}.bin'
            path = OUT / name
            with pinned_gzip_time():
                train.save_binary(str(path), protocol=protocol, compress=compress)
            back = DocumentArray.load_binary(str(path), protocol=protocol, compress=compress)
            recs = [doc_record(d) for d in back]
            assert recs == [doc_record(d) for d in train], name
            # the streaming reader must agree too
            if protocol == 'protobuf':
                with open(path, 'rb') as f:
                    streamed = list(DocumentArray.load_binary(f, protocol=protocol, compress=compress,
                                                              streaming=True))
                assert [doc_record(d) for d in streamed] == recs
            files[name] = {
                'protocol': protocol,
                'compress': compress,
                'effective_compress': effective_compress(protocol, compress),
                'size': path.stat().st_size,
                'docs': recs,
            }
    # protobuf-array + zlib is byte-identical to the uncompressed file
    assert (OUT / 'train.protobuf-array.zlib.bin').read_bytes() == (OUT / 'train.protobuf-array.none.bin').read_bytes()
    return files


def write_query_index():
    queries, index = build_query_index()
    files = {}
    for name, da in (('query.protobuf-array.none.bin', queries), ('index.protobuf-array.none.bin', index)):
        path = OUT / name
        da.save_binary(str(path), protocol='protobuf-array', compress=None)
        back = DocumentArray.load_binary(str(path), protocol='protobuf-array', compress=None)
        files[name] = {'protocol': 'protobuf-array', 'compress': None, 'effective_compress': None,
                       'size': path.stat().st_size, 'docs': [doc_record(d) for d in back]}
    return files


# --------------------------------------------------------------------------------------------
# malformed files
# --------------------------------------------------------------------------------------------

def try_load(path: Path, protocol, compress):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            da = DocumentArray.load_binary(str(path), protocol=protocol, compress=compress)
        return {'result': 'loaded', 'num_docs': len(da),
                'ids': [d.id if (d.chunks or d.tags) else '<empty Document, fresh random id>' for d in da],
                'empty_docs': sum(1 for d in da if not d.chunks and not d.tags)}
    except Exception as e:  # noqa: BLE001
        return {'result': 'error', 'error': f'{type(e).__name__}: {e}'.strip()[:300]}


def write_malformed(train: DocumentArray):
    mdir = OUT / 'malformed'
    mdir.mkdir(exist_ok=True)
    entries = []

    arr = (OUT / 'train.protobuf-array.none.bin').read_bytes()
    stream = (OUT / 'train.protobuf.none.bin').read_bytes()
    arr_gz = (OUT / 'train.protobuf-array.gzip.bin').read_bytes()

    def add(name, data, protocol, compress, what, run_docarray=True):
        p = mdir / name
        p.write_bytes(data)
        e = {'file': f'malformed/{name}', 'protocol': protocol, 'compress': compress,
             'size': len(data), 'what': what}
        if run_docarray:
            e['docarray_0_21_1'] = try_load(p, protocol, compress)
        entries.append(e)

    add('truncated.protobuf-array.none.bin', arr[: len(arr) // 2], 'protobuf-array', None,
        f'first {len(arr) // 2} of the {len(arr)} bytes of train.protobuf-array.none.bin (cut inside a DocumentProto)')
    # cut in the middle of the 3rd document's bytes
    pos = 9
    for _ in range(2):
        pos += 4 + int.from_bytes(stream[pos:pos + 4], 'big')
    third_len = int.from_bytes(stream[pos:pos + 4], 'big')
    cut = pos + 4 + third_len // 2
    add('truncated.protobuf.none.bin', stream[:cut], 'protobuf', None,
        f'first {cut} bytes of train.protobuf.none.bin: header says 6 docs, docs 1-2 complete, doc 3 '
        f'length prefix says {third_len} bytes but only {third_len // 2} follow')
    add('truncated.protobuf-array.gzip.bin', arr_gz[: len(arr_gz) // 2], 'protobuf-array', 'gzip',
        f'first {len(arr_gz) // 2} of the {len(arr_gz)} bytes of train.protobuf-array.gzip.bin (gzip stream cut)')
    rng = np.random.default_rng(1234)
    garbage = bytes([0xFF]) + rng.integers(0, 256, size=255, dtype=np.uint8).tobytes()
    add('garbage.bin', garbage, 'protobuf-array', None,
        '256 pseudo-random bytes (seed 1234), first byte 0xFF (protobuf tag with wire type 7, invalid). '
        'Read as protocol "protobuf" the header would claim version 0xFF and a huge doc count; '
        'docarray is not run that way (it would loop ~2^63 times producing empty Documents).')
    # header claims 9 docs, 6 present
    too_many = b'\x01' + (9).to_bytes(8, 'big') + stream[9:]
    add('count_too_large.protobuf.none.bin', too_many, 'protobuf', None,
        'train.protobuf.none.bin with the header doc count changed from 6 to 9 (valid docs, 3 missing)')
    too_few = b'\x01' + (4).to_bytes(8, 'big') + stream[9:]
    add('count_too_small.protobuf.none.bin', too_few, 'protobuf', None,
        'train.protobuf.none.bin with the header doc count changed from 6 to 4 (2 complete docs of trailing data)')
    bad_version = b'\x02' + stream[1:]
    add('version2.protobuf.none.bin', bad_version, 'protobuf', None,
        'train.protobuf.none.bin with the version byte changed from 0x01 to 0x02')
    write_json(mdir / 'README.json', {
        'generator': generator_info(),
        'note': 'docarray_0_21_1 = what DocumentArray.load_binary(path, protocol, compress) of docarray 0.21.1 '
                'does with the file. docarray never checks the version byte, never checks that the data ends '
                'where the last document ends, and reads missing length prefixes as 0 (an empty Document with a '
                'fresh random id). A Rust reader should reject every one of these files, count_too_small (trailing '
                'bytes) and version2 (unknown version) included.',
        'files': entries,
    })
    return entries


# --------------------------------------------------------------------------------------------
# CSV
# --------------------------------------------------------------------------------------------

CSV_FILES = {}


def csv_file(name, text, note, template=False):
    CSV_FILES[name] = {'text': text, 'note': note, 'template': template}


def define_csvs():
    inline = data_uri(png_bytes(make_image('diag', 4, 4)))
    csv_file('train.csv',
             'a red square,images/red_8x8.png\n'
             'a green gradient,images/green_gradient_16x8.png\n'
             'a blue checkerboard,images/blue_checker_8x8.png\n'
             'a gray square,images/gray_8x8.png\n'
             'a transparent square,images/rgba_8x8.png\n',
             'caption first, relative image paths, LF line endings, no header row')
    csv_file('train_swapped.csv',
             'images/red_8x8.png,a red square\n'
             'images/green_gradient_16x8.png,a green gradient\n'
             'images/blue_checker_8x8.png,a blue checkerboard\n'
             'images/gray_8x8.png,a gray square\n',
             'image first: the first row has a URI in column 1 and not in column 2, so the columns are swapped')
    csv_file('labeled.csv',
             'a red square,images/red_8x8.png,red\n'
             'a green gradient,images/green_gradient_16x8.png,green\n'
             'a dark red square,images/red_8x8.png,red\n'
             'ein blaues Schachbrett,images/blue_checker_8x8.png,blue\n',
             'caption, image, label. NOTE: Finetuner itself has no such format: a 3-column CSV is '
             'PairwiseScoreHandler (col3 -> tags["finetuner_score"], a similarity score) in 0.7.8+, and '
             'is_labeled=True means TWO columns (item, label). The label column here is a clipft extension.')
    csv_file('quoting.csv',
             '"a red square, with a comma",images/red_8x8.png\r\n'
             '"she said ""hello""",images/green_gradient_16x8.png\r\n'
             '"two\nlines",images/blue_checker_8x8.png\r\n'
             'plain caption,"images/with space, comma.png"\r\n'
             '"  spaces kept  ","images/gray_8x8.png"\r\n',
             'CRLF record ends; quoted fields with a comma, doubled quotes, an LF inside quotes, a quoted '
             'image path containing a space and a comma, a fully quoted row; spaces inside quotes are kept')
    csv_file('unicode_bom.csv',
             '\ufeffrobe rouge à pois,images/red_8x8.png\n'
             '红色连衣裙,images/café_8x8.png\n'
             'Ünïcödé — «guillemets» 👗,images/rgba_8x8.png\n',
             'UTF-8 with a BOM (EF BB BF), non-ASCII captions and a non-ASCII file name (NFC). '
             'Finetuner opened CSVs with encoding="utf-8" (not utf-8-sig), so it kept U+FEFF at the start of '
             'the first caption; the expected rows here have the BOM stripped.')
    csv_file('absolute.csv',
             '{ROOT}/images/red_8x8.png,a red square\n'
             '{ROOT}/images/gray_8x8.png,a gray square\n',
             'TEMPLATE: replace every "{ROOT}" with the absolute path of tests/fixtures/data (no trailing '
             'slash) before reading. Image first with absolute paths.', template=True)
    csv_file('missing.csv',
             'a red square,images/red_8x8.png\n'
             'a missing image,images/does_not_exist.png\n'
             'a gray square,images/gray_8x8.png\n',
             'row 2 names a file that does not exist in an existing directory. Finetuner accepts it at parse '
             'time (_is_uri is true because the parent directory exists and is writable; the doc keeps the uri '
             'and no blob); it only fails when the image is loaded.')
    csv_file('data_uri.csv',
             'a red square,images/red_8x8.png\n'
             f'a tiny inline image,"{inline}"\n',
             'row 2 has a data: URI image (quoted because "data:image/png;base64," contains a comma)')
    csv_file('blank_lines.csv',
             'a red square,images/red_8x8.png\n'
             '\n'
             'a gray square,images/gray_8x8.png\n'
             '\n',
             'blank lines: Finetuner 0.7.0-0.7.x skipped them ("if columns: ... else: continue"); 0.8.x '
             '(QueryDocumentRelationsHandler) would crash on them (col1, col2 = [] -> ValueError). '
             'Expected: skipped.')
    csv_file('no_uri.csv',
             'a red square,another caption\n'
             'a gray square,yet another caption\n',
             'neither column of the first row is a URI: Finetuner raises ValueError '
             '("Uri required in at least one colum for model with task: text-to-image.")')


def finetuner_parse(rows_iter, cwd: Path):
    """Finetuner 0.7.x load_finetune_data_from_csv for task text-to-image, convert_to_blob ignored.

    Returns rows [(caption, image, label)] or raises ValueError."""
    out = []
    t1 = None
    with contextlib.chdir(cwd):
        for columns in rows_iter:
            if not columns:
                continue  # skip empty lines (0.7.x)
            if len(columns) not in (2, 3):
                # Finetuner: `col1, col2 = columns` (2 cols) / `col1, col2, col3 = columns` (3 cols)
                raise ValueError(f'wrong number of values to unpack (got {len(columns)}): {columns!r}')
            col1, col2 = columns[0], columns[1]
            label = columns[2] if len(columns) > 2 else None
            if t1 is None:  # determine which column holds images from the FIRST non-empty row only
                if _is_uri(col1) and not _is_uri(col2):
                    t1, t2 = 'image', 'text'
                elif not _is_uri(col2):
                    raise ValueError('Uri required in at least one colum for model with task: text-to-image.')
                else:
                    t1, t2 = 'text', 'image'
            image = col1 if t1 == 'image' else col2
            caption = col2 if t1 == 'image' else col1
            if not _is_uri(image):
                raise ValueError(f'Expected uri in column 1, got {image}')
            out.append((caption, image, label, t1))
    return out


def write_csvs():
    define_csvs()
    result = {}
    root = str(OUT.resolve())
    for name, spec in CSV_FILES.items():
        text = spec['text']
        (OUT / name).write_bytes(text.encode('utf-8'))
        real = text.replace('{ROOT}', root) if spec['template'] else text
        # clipft reading: utf-8, BOM stripped, RFC-4180 / excel dialect
        body = real[1:] if real.startswith('\ufeff') else real
        entry = {'file': name, 'note': spec['note'], 'template': spec['template'],
                 'has_bom': text.startswith('\ufeff'), 'dialect': 'excel (RFC 4180): delimiter ",", quote \'"\', doubled quotes'}
        try:
            rows = finetuner_parse(csv.reader(io.StringIO(body, newline=''), dialect='excel'), OUT)
            entry['image_column'] = 0 if rows[0][3] == 'image' else 1
            entry['chunk_order'] = ['image', 'text'] if rows[0][3] == 'image' else ['text', 'image']
            tmpl_rows = finetuner_parse(csv.reader(io.StringIO(body, newline=''), dialect='excel'), OUT)
            entry['rows'] = []
            for (cap, img, lab, _t1) in tmpl_rows:
                img_written = img.replace(root, '{ROOT}') if spec['template'] else img
                local = None if img.startswith('data:') else (OUT / img if not os.path.isabs(img) else Path(img))
                entry['rows'].append({
                    'caption': cap, 'image': img_written, 'label': lab,
                    'image_is_data_uri': img.startswith('data:'),
                    'image_exists': True if local is None else local.is_file(),
                })
            entry['error'] = None
        except ValueError as e:
            entry['rows'] = None
            entry['error'] = f'ValueError: {e}'
        # what Finetuner itself would have done: sniff the dialect from the first 1024 chars, utf-8 (BOM kept)
        try:
            sn = csv.Sniffer().sniff(real[:1024])
            dialect = sn
            entry['finetuner_sniffed'] = {'delimiter': sn.delimiter, 'quotechar': sn.quotechar,
                                          'doublequote': sn.doublequote,
                                          'skipinitialspace': sn.skipinitialspace}
        except csv.Error as e:
            dialect = 'excel'
            entry['finetuner_sniffed'] = {'error': str(e), 'fallback': 'excel'}
        try:
            ft_rows = finetuner_parse(csv.reader(io.StringIO(real, newline=''), dialect=dialect), OUT)
            ft = [{'caption': c, 'image': i.replace(root, '{ROOT}') if spec['template'] else i, 'label': l}
                  for (c, i, l, _t) in ft_rows]
        except ValueError as e:
            ft = {'error': f'ValueError: {e}'}
        mine = None if entry['rows'] is None else [{k: r[k] for k in ('caption', 'image', 'label')} for r in entry['rows']]
        mine_or_err = {'error': entry['error']} if mine is None else mine
        entry['finetuner_0_7_same'] = (ft == mine_or_err)
        if ft != mine_or_err:
            entry['finetuner_0_7_rows'] = ft
        result[name] = entry
    write_json(OUT / 'expected_csv.json', {
        'generator': generator_info(),
        'rule': (
            'No header row; every non-empty record is data. Records are RFC 4180 (excel dialect). '
            'Relative paths are resolved against the CSV file\'s directory (Finetuner used the process cwd). '
            'Column detection (Finetuner check_columns, task text-to-image) uses the FIRST non-empty record '
            'only: is_uri(x) = scheme http/https/data, or the path exists, or its parent directory exists '
            '(and is writable); if is_uri(col1) and not is_uri(col2) the image is column 1 (index 0), '
            'else if not is_uri(col2) -> error, else the image is column 2 (index 1). Every later record '
            'uses the same assignment, and its image cell must again be is_uri, else error. '
            'A third column, when present, is the label (clipft extension). Chunk order in Finetuner\'s '
            'Document(chunks=[d1, d2]) follows the file\'s column order (chunk_order).'),
        'files': result,
    })
    return result


# --------------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------------

def call_like_evaluate(fn, r, max_rel, k):
    """DocumentArray.evaluate: fn(binary_relevance, **kwargs) with max_rel injected iff the
    function has that parameter; k only passed when the caller passed it (Finetuner: never)."""
    kwargs = {} if k is None else {'k': k}
    if 'max_rel' in fn.__code__.co_varnames:
        kwargs['max_rel'] = max_rel
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            v = fn(list(r), **kwargs)
    except Exception as e:  # noqa: BLE001
        return {'error': f'{type(e).__name__}: {e}'}
    if isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)):
        return int(v)
    v = float(v)
    if v != v:
        return {'nonfinite': 'nan'}
    if v in (float('inf'), float('-inf')):
        return {'nonfinite': 'inf' if v > 0 else '-inf'}
    return v


def metric_case(name, r, max_rel, k, note=''):
    case = {'name': name, 'r': list(map(int, r)), 'max_rel': max_rel, 'k': k, 'note': note, 'values': {}}
    for m in METRIC_NAMES:
        case['values'][m] = call_like_evaluate(getattr(da_eval, m), r, max_rel, k)
    # method=1 variants of dcg/ndcg (not used by evaluate's defaults)
    case['extra'] = {}
    for m in ('dcg_at_k', 'ndcg_at_k'):
        fn = getattr(da_eval, m)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter('ignore')
                case['extra'][m + '_method1'] = float(fn(list(r), method=1, k=k))
        except Exception as e:  # noqa: BLE001
            case['extra'][m + '_method1'] = {'error': f'{type(e).__name__}: {e}'}
    return case


def write_metrics():
    typical = [1, 1, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1]
    cases = [
        metric_case('single relevant at rank 1', [1, 0, 0, 0, 0], 1, None),
        metric_case('single relevant at rank 2', [0, 1, 0, 0, 0], 1, None),
        metric_case('single relevant at rank 3', [0, 0, 1, 0, 0], 1, None),
        metric_case('single relevant at rank 5 (last)', [0, 0, 0, 0, 1], 1, None),
        metric_case('single relevant at rank 20 of 20', [0] * 19 + [1], 1, None),
        metric_case('single relevant, more exist', [0, 0, 1, 0, 0, 0], 4, None),
        metric_case('all relevant, max_rel = n', [1] * 5, 5, None),
        metric_case('all relevant, max_rel > n', [1] * 5, 12, None),
        metric_case('no relevant match', [0] * 5, 3, None),
        metric_case('no relevant match, 20 long', [0] * 20, 40, None),
        metric_case('k=1, first irrelevant', [0, 1, 1], 2, 1),
        metric_case('k=1, first relevant', [1, 0, 0], 1, 1),
        metric_case('k larger than the list (precision divides by n)', [1, 0, 1], 2, 10),
        metric_case('k=3, relevant only after k', [0, 0, 0, 1, 1], 2, 3),
        metric_case('relevant beyond k', [0] * 9 + [1], 1, 5),
        metric_case('empty list, k None', [], 1, None),
        metric_case('empty list, k=5', [], 3, 5),
        metric_case('max_rel None (label mode without counts)', [1, 0, 1], None, None),
        metric_case('max_rel 0', [0, 0], 0, None, 'recall: 0/0 in numpy -> nan'),
        metric_case('hits exceed max_rel', [1, 1, 1], 2, None),
        metric_case('k=0 is rejected by the @k functions', [1, 0], 1, 0),
        metric_case('k=-1 is rejected by the @k functions', [1, 0], 1, -1),
        metric_case('mixed', [1, 0, 1, 0, 1, 0, 0, 1], 6, None),
        metric_case('mixed, k=4', [1, 0, 1, 0, 1, 0, 0, 1], 6, 4),
        metric_case('max_rel much larger than list', [0, 1, 1, 0, 0, 1, 0, 0, 0, 1, 0, 1], 30, None),
        metric_case('typical 20 (limit), max_rel 25 > 20', typical, 25, None),
        metric_case('typical 20, k=5', typical, 25, 5),
        metric_case('typical 20, k=20', typical, 25, 20),
        metric_case('single element relevant', [1], 1, None),
        metric_case('single element irrelevant', [0], 1, None),
        metric_case('r_precision: R=1, rank 2', [0, 1], 1, None,
                    'r_precision = mean(r[:1]) = 0; ndcg method 0 = 1.0 (ranks 1 and 2 weigh the same)'),
        metric_case('r_precision: R=2', [1, 0, 0, 1], 2, None),
        metric_case('dcg ideal from the same list, cut at k', [0, 0, 1, 1], 2, 2,
                    'ideal = sorted(r, desc)[:k] = [1,1] -> 2; dcg([0,0]) = 0'),
        metric_case('graded relevance (not produced by evaluate)', [3, 0, 2, 1], 3, None,
                    'nonzero counts as relevant for the binary metrics; dcg/ndcg use the grades'),
    ]
    rng = np.random.default_rng(20240611)
    for i in range(20):
        n = int(rng.integers(1, 26))
        p = float(rng.uniform(0.05, 0.6))
        r = (rng.random(n) < p).astype(int).tolist()
        hits = sum(r)
        max_rel = max(1, hits + int(rng.integers(0, 10)))
        k = None if rng.random() < 0.5 else int(rng.integers(1, 30))
        cases.append(metric_case(f'random {i}', r, max_rel, k, 'seed 20240611'))
    write_json(OUT / 'metrics.json', {
        'generator': generator_info(),
        'how': 'values[m] = docarray.math.evaluation.<m>(r, **kw), kw = {"k": k} if k is not null, plus '
               '"max_rel": max_rel for recall_at_k and f1_score_at_k (the functions with a max_rel parameter), '
               'exactly as DocumentArray.evaluate calls them; dcg/ndcg use method=0. A value is a JSON number '
               '(hit_at_k: an integer), or {"error": "<ExceptionType>: <message>"}, or {"nonfinite": "nan"}. '
               'extra.*_method1 = the same with method=1.',
        'metrics': METRIC_NAMES,
        'cases': cases,
    })
    return cases


# --------------------------------------------------------------------------------------------
# end-to-end evaluation
# --------------------------------------------------------------------------------------------

def cosine_da(x, y, eps=1e-7):
    """docarray.math.distance.numpy.cosine."""
    return 1 - np.clip((np.dot(x, y.T) + eps) / (np.outer(np.linalg.norm(x, axis=1), np.linalg.norm(y, axis=1)) + eps), -1, 1)


def finetuner_evaluate(query_da: DocumentArray, index_da: DocumentArray, limit=20, exclude_self=True):
    """Finetuner v0.4.1 Evaluator (finetuner/tuner/evaluation.py) in label mode, embeddings as float64."""
    from collections import defaultdict
    groups = defaultdict(list)
    for d in index_da:
        groups[d.tags['finetuner_label']].append(d.id)
    ground_truth = DocumentArray([
        Document(id=d.id, matches=DocumentArray([Document(id=m) for m in groups.get(d.tags['finetuner_label'], [])]))
        for d in query_da
    ])
    summary = DocumentArray([Document(id=d.id, embedding=np.asarray(d.embedding, dtype=np.float64)) for d in query_da])
    summary.match(index_da, limit=limit, metric='cosine', num_worker=1, exclude_self=exclude_self)
    metrics = {}
    for name in METRIC_NAMES:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            res = summary.evaluate(ground_truth=ground_truth, metrics=[getattr(da_eval, name)], metric_names=[name])
        metrics[name] = res[name]
    per_query = []
    for d, gt, q in zip(summary, ground_truth, query_da):
        desired = {m.id for m in gt.matches}
        per_query.append({
            'id': d.id,
            'label': q.tags['finetuner_label'],
            'match_ids': [m.id for m in d.matches],
            'match_cosine_distances': [float(m.scores['cosine'].value) for m in d.matches],
            'binary_relevance': [1 if m.id in desired else 0 for m in d.matches],
            'max_rel': len(gt.matches),
            'evaluations': {name: float(d.evaluations[name].value) for name in METRIC_NAMES},
        })
    return metrics, per_query


def ranking_is_robust(q32, i32, limit, exclude_ids=None):
    """No near-ties among the first limit+1 of each query, and float32 ranking == docarray's float64 one."""
    d64 = cosine_da(q32.astype(np.float64), i32.astype(np.float64))
    qn = q32 / np.linalg.norm(q32, axis=1, keepdims=True)
    inn = i32 / np.linalg.norm(i32, axis=1, keepdims=True)
    d32 = (1 - qn @ inn.T).astype(np.float32)
    min_gap = np.inf
    for qi in range(q32.shape[0]):
        order64 = np.argsort(d64[qi], kind='stable')
        order32 = np.argsort(d32[qi], kind='stable')
        if exclude_ids is not None:
            order64 = order64[order64 != exclude_ids[qi]]
            order32 = order32[order32 != exclude_ids[qi]]
        n = min(limit + 1, len(order64))
        if not np.array_equal(order64[:n], order32[:n]):
            return False, 0.0
        gaps = np.diff(d64[qi][order64[:n]])
        if len(gaps):
            min_gap = min(min_gap, float(gaps.min()))
    return min_gap > 1e-5, min_gap


def make_embeddings(seed, n_q, n_i, dim, index_counts, query_labels, spread):
    rng = np.random.default_rng(seed)
    n_labels = len(index_counts)
    centroids = rng.normal(size=(n_labels, dim))
    index_labels = np.repeat(np.arange(n_labels), index_counts)
    rng.shuffle(index_labels)
    idx = (centroids[index_labels] + spread * rng.normal(size=(n_i, dim))).astype(np.float32)
    q = (centroids[query_labels] + spread * rng.normal(size=(n_q, dim))).astype(np.float32)
    return q, idx, index_labels


def eval_record(query_da, index_da, metrics, per_query, seed, min_gap, exclude_self, limit, desc):
    return {
        'description': desc,
        'seed': seed,
        'limit': limit,
        'distance': 'cosine',
        'exclude_self': exclude_self,
        'embedding_dtype_in_json': 'float32 (each number is the exact value of a float32)',
        'embedding_dtype_used': 'float64 (Finetuner\'s Evaluator casts embeddings to float64)',
        'cosine_distance_formula': 'docarray: 1 - clip((x.y + 1e-7) / (|x||y| + 1e-7), -1, 1)',
        'min_gap_between_adjacent_distances_in_top_limit_plus_1': min_gap,
        'queries': [{'id': d.id, 'label': d.tags['finetuner_label'],
                     'embedding': [float(v) for v in d.embedding]} for d in query_da],
        'index': [{'id': d.id, 'label': d.tags['finetuner_label'],
                   'embedding': [float(v) for v in d.embedding]} for d in index_da],
        'metrics': metrics,
        'per_query': per_query,
    }


def write_eval_case():
    limit = 20
    # main case: 40 text-like queries vs 200 image-like index docs, 10 labels, uneven label counts
    counts = [5, 8, 12, 15, 18, 20, 22, 25, 35, 40]
    assert sum(counts) == 200
    query_labels = np.arange(40) % 10
    seed = 7
    while True:
        q, idx, index_labels = make_embeddings(seed, 40, 200, 16, counts, query_labels, spread=1.1)
        ok, min_gap = ranking_is_robust(q, idx, limit)
        if ok:
            break
        seed += 1
    query_da = DocumentArray([Document(id=f'q{i:02d}', embedding=q[i], tags={'finetuner_label': f'label-{query_labels[i]}'})
                              for i in range(40)])
    index_da = DocumentArray([Document(id=f'i{i:03d}', embedding=idx[i].astype(np.float64),
                                       tags={'finetuner_label': f'label-{index_labels[i]}'}) for i in range(200)])
    metrics, per_query = finetuner_evaluate(query_da, index_da, limit=limit, exclude_self=True)
    # cross-check with an independent computation
    for pq in per_query:
        assert len(pq['match_ids']) == limit
    index_da_json = DocumentArray([Document(id=d.id, embedding=idx[i], tags=d.tags) for i, d in enumerate(index_da)])
    main = eval_record(query_da, index_da_json, metrics, per_query, seed, min_gap, True, limit,
                       'query ids and index ids are disjoint, so exclude_self has no effect; max_rel = number of '
                       'index docs with the query label (5..40, may exceed limit 20)')

    # self-match case: the index is the query set itself (Evaluator with index_data=None), exclude_self=True
    counts2 = [3, 4, 5, 5, 6, 7]
    labels2 = np.repeat(np.arange(6), counts2)
    seed2 = 11
    while True:
        rng = np.random.default_rng(seed2)
        cent = rng.normal(size=(6, 8))
        e = (cent[labels2] + 0.9 * rng.normal(size=(30, 8))).astype(np.float32)
        ok, min_gap2 = ranking_is_robust(e, e, limit, exclude_ids=np.arange(30))
        if ok:
            break
        seed2 += 1
    self_da = DocumentArray([Document(id=f's{i:02d}', embedding=e[i], tags={'finetuner_label': int(labels2[i])})
                             for i in range(30)])
    self_idx = DocumentArray([Document(id=d.id, embedding=e[i].astype(np.float64), tags=d.tags)
                              for i, d in enumerate(self_da)])
    metrics2, per_query2 = finetuner_evaluate(self_da, self_idx, limit=limit, exclude_self=True)
    for pq in per_query2:
        assert pq['id'] not in pq['match_ids'] and len(pq['match_ids']) == limit
    selfcase = eval_record(self_da, self_da, metrics2, per_query2, seed2, min_gap2, True, limit,
                           'index = query set (30 docs, 6 int labels stored as tags -> 0.0..5.0 after protobuf, '
                           'here kept as JSON ints); exclude_self=True drops each query from its own matches, '
                           'but max_rel still counts it (label count including self), so recall < 1 even when '
                           'every other same-label doc is retrieved')
    main['self_match_case'] = selfcase
    main['generator'] = generator_info()
    write_json(OUT / 'eval_case.json', main)
    return main


# --------------------------------------------------------------------------------------------
# FORMAT.md
# --------------------------------------------------------------------------------------------

def hexdump(data: bytes, n=64) -> str:
    lines = []
    for off in range(0, min(n, len(data)), 16):
        chunk = data[off:off + 16]
        hx = ' '.join(f'{b:02x}' for b in chunk)
        asc = ''.join(chr(b) if 32 <= b < 127 else '.' for b in chunk)
        lines.append(f'{off:08x}  {hx:<47}  |{asc}|')
    return '\n'.join(lines)


FORMAT_TEMPLATE = r'''# tests/fixtures/data: formats

Written by `scripts/make_data_fixtures.py` (do not edit by hand; re-run the script).
Generator versions: {versions}.

## 1. docarray v1 binary files (`DocumentArray.save_binary(path, protocol=P, compress=C)`)

Source read: docarray 0.21.1 `docarray/array/mixins/io/binary.py` (`save_binary`, `to_bytes`,
`load_binary`, `_load_binary_all`, `_load_binary_stream`, `_stream_header`),
`docarray/document/mixins/porting.py` (`Document.to_bytes/from_bytes/_to_stream_bytes`),
`docarray/helper.py` (`compress_bytes`, `decompress_bytes`, `get_compress_ctx`,
`protocol_and_compress_from_file_path`), `docarray/proto/io/__init__.py` (`flush_proto`/`parse_proto`).

There is **no magic number and no self-description**: a file does not say its protocol or its
compression. docarray takes both from the caller, or from the file name: `save_binary`/`load_binary`
scan every suffix of the name and a suffix equal to one of `protobuf`, `protobuf-array`, `pickle`,
`pickle-array` sets the protocol, one of `lz4`, `bz2`, `lzma`, `zlib`, `gzip` sets the compression,
overriding the arguments. The fixture names `train.<protocol>.<compress|none>.bin` therefore carry
both (`none` is not a recognised suffix and means uncompressed). The default protocol of
`save_binary`/`to_bytes` is `pickle-array` (Python pickle), which a Rust reader cannot support.

### 1.1 protocol `protobuf-array`

The whole file is ONE serialized `docarray.DocumentArrayProto` (`message DocumentArrayProto {{
repeated DocumentProto docs = 1; }}`), i.e. a sequence of `0x0a <varint length> <DocumentProto bytes>`
records, nothing before or after. An empty DocumentArray is an empty (0-byte) file.

Compression wraps the **whole file** as one stream (docarray writes through a streaming
compressor file object):

| C | on disk | first bytes |
|---|---|---|
| none | the raw DocumentArrayProto | `0a ..` |
| lz4 | one **LZ4 frame** (`lz4.frame.LZ4FrameFile(f, 'wb')`: level 0; FLG `40` = version 01, linked blocks, no block checksum, **no content size**, no content checksum; BD `40` = block max size 64 KiB; then blocks (u32 LE size, high bit set = stored uncompressed) and the `00 00 00 00` end mark) | `04 22 4d 18 40 40 c0` (LE magic 0x184D2204, FLG, BD, header checksum) |
| gzip | one gzip member (`gzip.GzipFile(fileobj=f, mode='wb')`, level 9): the header has FLG.FNAME set and carries the file's basename (here e.g. `train.protobuf-array.gzip.bin`), MTIME = write time (pinned to {gzip_mtime} here), XFL 2, OS 255 | `1f 8b 08 08` |
| bz2 | one bzip2 stream (`bz2.BZ2File`, level 9) | `42 5a 68 39` (`BZh9`) |
| lzma | one **.xz** container (`lzma.LZMAFile`, FORMAT_XZ, CRC64 check, preset 6) | `fd 37 7a 58 5a 00` |
| **zlib** | **NOT COMPRESSED.** `get_compress_ctx('zlib')` returns None, so `to_bytes` writes the raw DocumentArrayProto and `load_binary` parses it raw. `train.protobuf-array.zlib.bin` is byte-identical to `train.protobuf-array.none.bin`. A reader asked for protobuf-array+zlib must read the bytes as uncompressed (for robustness it may also accept a real zlib stream, which starts `78 01/5e/9c/da`; a DocumentArrayProto starts `0a`). | `0a ..` |

docarray's loader for protobuf-array: read all bytes, decompress the whole buffer
(`lz4.frame.decompress`, `gzip.decompress`, `bz2.decompress`, `lzma.decompress`; zlib: nothing),
`DocumentArrayProto.ParseFromString`.

### 1.2 protocol `protobuf` (the "V1 streaming" format)

```
offset 0   u8        version = 0x01
offset 1   u64 BE    number of documents N            (8 bytes, big-endian, unsigned)
offset 9   N times:
           u32 BE    L = byte length of the next record (4 bytes, big-endian, unsigned; NOT a varint)
           L bytes   the record = compress(DocumentProto bytes)
```

* The 9-byte header and the 4-byte length prefixes are **never compressed**. Compression is applied
  **per document**: each record is `compress_bytes(DocumentProto.SerializePartialToString(), C)`,
  and L is the length of the *compressed* record. With C = none a record is the bare `DocumentProto`
  (not wrapped in a DocumentArrayProto field-1 tag).
* Per-record compressors (`docarray.helper.compress_bytes`), each record a complete stand-alone stream:
  `lz4` = `lz4.frame.compress(b)` (an LZ4 frame, level 0; FLG `68` = version 01, independent blocks,
  **content size stored** (8 bytes LE after BD), no checksums; BD `40` = 64 KiB) -> record starts `04 22 4d 18 68 40`; `gzip` = `gzip.compress(b)`
  (level 9, **no FNAME**, FLG=0, MTIME = write time, pinned to {gzip_mtime} here) -> `1f 8b 08 00`;
  `zlib` = `zlib.compress(b)` (RFC 1950, level -1=6) -> `78 9c`; `bz2` = `bz2.compress(b)` -> `BZh9`;
  `lzma` = `lzma.compress(b)` (.xz container) -> `fd 37 7a 58 5a 00`.
  So for `protobuf`, **zlib really compresses** (unlike protobuf-array).
* docarray never checks the version byte (it reads and ignores it), never checks that the data ends
  after record N, and a short read of a length prefix becomes 0 (an empty Document). See
  `malformed/README.json` for what it does with each broken file. A Rust reader should validate:
  version == 1, each L fits in the remaining bytes, no trailing bytes after record N.
* Difference with/without compression: only the record bytes (and hence each L) change; the header
  and framing are identical. Compare the two dumps below.

### 1.3 Hex dumps (first 64 bytes)

`train.protobuf-array.none.bin` ({size_arr} bytes): `0a` = field 1 (docs), LEN; then the varint
length of the first DocumentProto; inside it `0a 06 "pair-0"` = field 1 id, then `72` = field 14
(chunks) LEN ...

```
{dump_arr}
```

`train.protobuf.none.bin` ({size_stream} bytes): `01` version, `00 00 00 00 00 00 00 06` = 6 docs,
then `{len0}` = u32 BE length of document 0 ({len0_dec} bytes), then the DocumentProto itself
(`0a 06 "pair-0"` ...):

```
{dump_stream}
```

`train.protobuf.lz4.bin` ({size_stream_lz4} bytes): same header, then `{len0_lz4}` = length of the
LZ4-compressed document 0 ({len0_lz4_dec} bytes), then the LZ4 frame `04 22 4d 18 ...`:

```
{dump_stream_lz4}
```

`train.protobuf-array.gzip.bin` ({size_arr_gz} bytes): one gzip member over the whole file; note the
FNAME field:

```
{dump_arr_gz}
```

### 1.4 DocumentProto content in these fixtures

(`docarray.proto`, package `docarray`, docarray 0.21.1; see shared/reference/jina-protocol.md section 2.)
Only non-empty fields are written (`Document.non_empty_fields`), in field-number order.

* Parents: `id` (1), `tags` (17, `google.protobuf.Struct`), `chunks` (14, repeated DocumentProto).
* Chunks: `id` (1), one `content` oneof: `text` (4) | `blob` (2, the PNG file bytes) | `tensor` (3,
  NdArrayProto) or no content at all; `granularity` (5) = 1 and `parent_id` (7) = the parent's id are
  set automatically by docarray when a chunk is attached; `uri` (9); `modality` (10, "text"/"image");
  `mime_type` (11): docarray fills it from the uri (`images/x.png` -> `image/png` by extension; a
  `data:image/png;base64,...` uri -> `image/png` from the media type); set explicitly on pair-0's blob
  chunk; absent on the tensor chunks.
* **Empty caption**: `Document(text='')` writes NO content field at all (empty string = unset), so the
  chunk of pair 3 has only id/granularity/parent_id/modality="text". docarray's `.text` then returns `''`.
  `expected_train.json` gives `"text": null` for it (field absent); treat modality "text" with no
  content as the empty caption.
* tensor: `NdArrayProto {{ dense (1) = DenseNdArrayProto {{ buffer (1) = raw C-order bytes,
  shape (2) = packed repeated uint32, dtype (3) = numpy dtype.str, here "|u1" }}, cls_name (3) = "numpy" }}`.
  The image tensors here are uint8 HWC [4, 4, 3].
* uri forms used: relative path `images/...png` (relative to tests/fixtures/data/), `data:image/png;base64,...`.
  pair-3's image has both `uri` and `blob` (what `load_uri_to_blob()` leaves): the blob is the file's bytes.
* tags (Struct): every number is a double on the wire (`finetuner_label: 1` reads back as `1.0`; the JSON
  files write `1.0`); strings, bool, null, nested Struct, and ListValue appear in pair-4's tags. Struct
  map entries are written in upb's map order, not insertion order; don't depend on it.
* Chunk order is as written: pair-5 has the image chunk first.

## 2. CSV files

Finetuner-style: no header row; two columns caption,image in either order, or (clipft extension)
three columns caption,image,label. RFC 4180 quoting. The column detection rule and per-file notes are
in `expected_csv.json` ("rule", "files.*.note"). Facts from Finetuner's source (v0.7.0 `finetuner/data.py`
`load_finetune_data_from_csv`, v0.8.1 `QueryDocumentRelationsHandler`):

* the CSV dialect was sniffed with Python's `csv.Sniffer` on the first 1024 characters (fallback
  "excel"); {sniff_summary};
* the image/caption column assignment is decided from the **first** non-empty row only, with
  docarray's `_is_uri` (http/https/data scheme, or the path exists, or its directory exists and is
  writable), evaluated against the process cwd; later rows reuse it;
* blank lines were skipped in 0.7.x; 0.8.x would raise on them;
* the file was opened with encoding "utf-8", so a BOM stayed in the first caption;
* `Document(chunks=[d1, d2])` keeps the file's column order (image first for swapped files);
* 0.8.x also gave each pair an artificial integer `finetuner_label` (0, 1, 2, ... keyed on the text of
  column 1), and a 3-column file was a *pairwise-score* file, not a labelled one.

`absolute.csv` is a **template**: replace `{{ROOT}}` with the absolute path of `tests/fixtures/data`
(no trailing slash) before parsing; `expected_csv.json` keeps `{{ROOT}}` in the expected image paths.

## 3. metrics.json, eval_case.json

See the "how" / "description" fields inside. A metric value is a JSON number (hit_at_k: an integer), or
`{{"error": "..."}}` (docarray raised), or `{{"nonfinite": "nan"}}`.

## 4. Files

| file | bytes | sha256 |
|---|---|---|
{file_table}
'''


def write_format_md(csv_result):
    arr = (OUT / 'train.protobuf-array.none.bin').read_bytes()
    stream = (OUT / 'train.protobuf.none.bin').read_bytes()
    stream_lz4 = (OUT / 'train.protobuf.lz4.bin').read_bytes()
    arr_gz = (OUT / 'train.protobuf-array.gzip.bin').read_bytes()
    assert arr[:1] == b'\x0a' and stream[:9] == b'\x01' + (6).to_bytes(8, 'big')
    assert stream_lz4[9 + 4:9 + 8] == b'\x04\x22\x4d\x18' and arr_gz[:4] == b'\x1f\x8b\x08\x08'
    odd = {n: e['finetuner_sniffed'] for n, e in csv_result.items()
           if (e['finetuner_sniffed'].get('delimiter'), e['finetuner_sniffed'].get('quotechar')) != (',', '"')}
    differ = [n for n, e in csv_result.items() if not e['finetuner_0_7_same']]
    sniff_summary = (
        'for every fixture except ' + ', '.join(f'`{n}` (sniffed delimiter {e.get("delimiter")!r})' for n, e in odd.items())
        + ' the sniffer picks delimiter "," and quote \'"\'. Finetuner 0.7 (sniffer, utf-8 without BOM '
        'stripping, first-row detection) would NOT produce the expected rows for '
        + ', '.join(f'`{n}`' for n in differ)
        + ' (expected_csv.json: finetuner_0_7_rows). clipft should not sniff: read RFC 4180 with ","')
    rows = []
    for p in sorted(OUT.rglob('*')):
        if p.is_file() and p.name != 'FORMAT.md':
            b = p.read_bytes()
            rows.append(f'| `{p.relative_to(OUT)}` | {len(b)} | `{sha256(b)[:16]}…` |')
    g = generator_info()
    text = FORMAT_TEMPLATE.format(
        versions=', '.join(f'{k} {v}' for k, v in g.items() if k != 'script'),
        gzip_mtime=GZIP_MTIME,
        size_arr=len(arr), dump_arr=hexdump(arr),
        size_stream=len(stream), dump_stream=hexdump(stream),
        len0=' '.join(f'{b:02x}' for b in stream[9:13]), len0_dec=int.from_bytes(stream[9:13], 'big'),
        size_stream_lz4=len(stream_lz4), dump_stream_lz4=hexdump(stream_lz4),
        len0_lz4=' '.join(f'{b:02x}' for b in stream_lz4[9:13]), len0_lz4_dec=int.from_bytes(stream_lz4[9:13], 'big'),
        size_arr_gz=len(arr_gz), dump_arr_gz=hexdump(arr_gz),
        sniff_summary=sniff_summary,
        file_table='\n'.join(rows),
    )
    (OUT / 'FORMAT.md').write_text(text, encoding='utf-8')


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    write_images()
    train = build_train()
    files = write_train_files(train)
    files.update(write_query_index())
    write_json(OUT / 'expected_train.json', {
        'generator': generator_info(),
        'note': 'Per file: what docarray 0.21.1 DocumentArray.load_binary(file, protocol, compress) returns. '
                '"effective_compress" is what is really on disk (protobuf-array+zlib is uncompressed). '
                'Per doc: text = the text field (null when absent; an empty caption is absent on the wire), '
                'uri/mime_type/parent_id null when unset, blob_sha256 over the blob bytes, tensor with dtype '
                'string, shape and flat C-order values, tags with every number as a double. '
                'Relative uris are relative to tests/fixtures/data/.',
        'files': files,
    })
    write_malformed(train)
    csv_result = write_csvs()
    write_metrics()
    write_eval_case()
    write_format_md(csv_result)
    total = sum(p.stat().st_size for p in OUT.rglob('*') if p.is_file())
    print(f'wrote {sum(1 for p in OUT.rglob("*") if p.is_file())} files, {total} bytes into {OUT}')
    assert total < 1_000_000, total


if __name__ == '__main__':
    main()
