"""Finetuner's ``finetuner.data``: :class:`CSVOptions` and :func:`build_encoding_dataset`.

A CSV given with ``csv_options`` (or as an open file) is read here as Finetuner reads it (the
dialect sniffed or named, the encoding, ``size`` rows after ``sampling_rate`` thinning) and
handed to the trainer as a plain comma-separated UTF-8 CSV whose local image paths are absolute:
found below the CSV's folder first (clipft's rule), else below the current folder (Finetuner's,
which opened them from the notebook's folder).
"""

import csv
import io
import itertools
import os
import random
from dataclasses import dataclass
from typing import Any, Iterator, List, Optional, Union

from ._data import _SCHEMES


@dataclass
class CSVOptions:
    """How a CSV is read (Finetuner's fields and defaults).

    ``size``: at most this many rows; ``sampling_rate``: each row is kept with this
    probability (before ``size`` counts); ``dialect``: ``'auto'`` (sniffed from the first 1024
    characters, else ``'excel'``), a name from :func:`csv.list_dialects` or a
    :class:`csv.Dialect`; ``encoding``: the file's. ``is_labeled=True`` (item and label
    columns) describes data CLIPLoss cannot train on and is refused. ``convert_to_blob`` is
    always in effect (local images travel to the trainer inside the push), and the point-cloud
    fields concern 3D meshes, which CLIP does not take.
    """

    size: Optional[int] = None
    sampling_rate: Optional[float] = None
    dialect: Union[str, Any] = "auto"
    encoding: str = "utf-8"
    is_labeled: bool = False
    convert_to_blob: bool = True
    create_point_clouds: bool = True
    point_cloud_size: int = 2048


def check_options(options: Any) -> Optional[CSVOptions]:
    """``options`` checked: None, or a :class:`CSVOptions` clipft can honour."""
    if options is None:
        return None
    if not isinstance(options, CSVOptions):
        raise TypeError(f"csv_options must be a CSVOptions, got {type(options).__name__}")
    if options.size is not None and (not isinstance(options.size, int) or options.size < 1):
        raise ValueError(f"CSVOptions size must be a positive int, got {options.size!r}")
    rate = options.sampling_rate
    if rate is not None and (not isinstance(rate, (int, float)) or not 0 < rate <= 1):
        raise ValueError(f"CSVOptions sampling_rate must be in (0, 1], got {rate!r}")
    if options.is_labeled:
        raise ValueError(
            "CSVOptions is_labeled=True reads items with their labels; CLIP trains on "
            "caption-image pairs (give two columns, caption and image, and optionally a third, "
            "the label)"
        )
    return options


def _dialect(sample: str, options: CSVOptions):
    if isinstance(options.dialect, str) and options.dialect == "auto":
        try:
            return csv.Sniffer().sniff(sample)
        except csv.Error:
            return "excel"
    if isinstance(options.dialect, str) and options.dialect not in csv.list_dialects():
        raise ValueError(
            f"CSVOptions dialect {options.dialect!r}: use 'auto' or one of {csv.list_dialects()}"
        )
    return options.dialect


def _rows(text: str, options: CSVOptions, seed: int) -> Iterator[List[str]]:
    rows = csv.reader(io.StringIO(text), dialect=_dialect(text[:1024], options))
    rows = (r for r in rows if any(c.strip() for c in r))
    if options.sampling_rate is not None and options.sampling_rate < 1:
        rng = random.Random(seed)
        rows = (r for r in rows if rng.random() < options.sampling_rate)
    return itertools.islice(rows, options.size)


def _absolute(cell: str, folders: List[str]) -> str:
    """A cell naming a local file below one of ``folders``, as an absolute path; any other
    cell (a caption, a URI, a label) as it is."""
    if not cell or cell.lower().startswith(_SCHEMES) or "://" in cell or os.path.isabs(cell):
        return cell
    for folder in folders:
        path = os.path.join(folder, cell)
        if os.path.isfile(path):
            return os.path.abspath(path)
    return cell


def looks_like_csv(path: str, options: CSVOptions) -> bool:
    """Whether the file at ``path`` is text in the options' encoding (a CSV), not a docarray
    file."""
    with open(path, "rb") as f:
        head = f.read(4096)
    if b"\0" in head:
        return False
    try:
        head.decode(options.encoding)
    except UnicodeDecodeError as e:
        # A multi-byte character cut at the end of the sample is still text.
        return e.start >= len(head) - 4
    return True


def rewrite_csv(source: Any, options: Optional[CSVOptions], dest: str, seed: int = 0) -> int:
    """Writes the rows of ``source`` (a CSV path or an open text file) to ``dest`` as the
    trainer reads CSVs, with ``options`` applied; returns the number of rows."""
    options = options or CSVOptions()
    if hasattr(source, "read"):
        text = source.read()
        if isinstance(text, bytes):
            text = text.decode(options.encoding)
        folders = [os.getcwd()]
    else:
        with open(source, encoding=options.encoding, newline="") as f:
            text = f.read()
        folders = [os.path.dirname(os.path.abspath(source)), os.getcwd()]
    n = 0
    with open(dest, "w", encoding="utf-8", newline="") as out:
        writer = csv.writer(out)
        for row in _rows(text, options, seed):
            writer.writerow([_absolute(c, folders) for c in row])
            n += 1
    return n


def build_encoding_dataset(model: Any, data: List[str]):
    """Finetuner's helper: a DocumentArray of ``data``, texts for a ``clip-text`` model and
    image URIs or paths for ``clip-vision``."""
    from docarray import Document, DocumentArray

    if isinstance(data, str) or not all(isinstance(d, str) for d in data):
        raise TypeError("data must be a list of str")
    text = getattr(model, "select_model", None) == "clip-text"
    return DocumentArray([Document(text=d) if text else Document(uri=d) for d in data])
