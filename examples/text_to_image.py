"""Finetuner's "Text-to-Image Search via CLIP" guide, on clipft, as a notebook-style script.

The guide's code with one changed line (`import clipft as finetuner`), on the repository's
demo data (captioned garment drawings in data/demo) instead of the fashion dataset Finetuner
kept in its cloud. Install the package and run it from the repository root:

    pip install ./python
    python examples/text_to_image.py

By default it fine-tunes the tiny CLIP in tests/fixtures/clip-tiny, offline, in this process.
`CLIPFT_MODEL=openai/clip-vit-base-patch32` fine-tunes the real backbone (fetched from the
Hugging Face hub); `CLIPFT_TRAINER=grpc://host:8081` (and `CLIPFT_AUTH_TOKEN`) sends the run to
a `clipft trainer`. `CLIPFT_EPOCHS`, `CLIPFT_LEARNING_RATE` and `CLIPFT_RUN_NAME` change the run.
"""

import csv
import os
import sys

import numpy as np
from docarray import Document, DocumentArray

import clipft as finetuner
from clipft.callback import EvaluationCallback

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "..", "data", "demo")
MODEL = os.environ.get("CLIPFT_MODEL") or os.path.join(HERE, "..", "tests", "fixtures", "clip-tiny")
EPOCHS = int(os.environ.get("CLIPFT_EPOCHS", "3"))
LEARNING_RATE = float(os.environ.get("CLIPFT_LEARNING_RATE", "1e-4"))
RUN_NAME = os.environ.get("CLIPFT_RUN_NAME", "clip-fashion")


def rows(name):
    with open(os.path.join(DATA, name), newline="") as f:
        return list(csv.reader(f))


def image_path(p):
    return os.path.join(DATA, p)


# %% [markdown]
# ## Data
# Training pairs: a parent Document per picture, with a text chunk (the caption) and an image
# chunk. The guide's images were blobs; `load_uri_to_blob()` makes them so.

# %%
def pairs(name):
    da = DocumentArray()
    for caption, path in rows(name):
        image = Document(uri=image_path(path), modality="image")
        image.load_uri_to_blob()
        da.append(Document(chunks=[Document(text=caption, modality="text"), image]))
    return da


train_da = pairs("train.csv")
eval_da = pairs("eval.csv")

# Evaluation: text queries and an image index, labelled with `finetuner_label`.
query_da = DocumentArray(
    Document(text=text, tags={"finetuner_label": label}) for text, label in rows("query.csv")
)
index_da = DocumentArray(
    Document(uri=image_path(path), tags={"finetuner_label": label}) for path, label in rows("index.csv")
)
print(f"{len(train_da)} training pairs, {len(eval_da)} validation pairs, "
      f"{len(query_da)} queries, {len(index_da)} index images")

# %% [markdown]
# ## Backbones and login

# %%
finetuner.describe_models(task="text-to-image")
finetuner.login()

# %% [markdown]
# ## Fine-tuning

# %%
if RUN_NAME in [r.name for r in finetuner.list_runs()]:
    finetuner.delete_run(RUN_NAME)

run = finetuner.fit(
    model=MODEL,
    run_name=RUN_NAME,
    train_data=train_da,
    eval_data=eval_da,
    epochs=EPOCHS,
    learning_rate=LEARNING_RATE,
    loss="CLIPLoss",
    cpu=False,
    callbacks=[
        EvaluationCallback(
            query_data=query_da,
            index_data=index_da,
            model="clip-text",
            index_model="clip-vision",
        )
    ],
)
print(run.status())

# %% [markdown]
# ## Monitoring
# A notebook restarted mid-run finds the run again by name.

# %%
run = finetuner.get_run(RUN_NAME)
for log_entry in run.stream_logs():
    print(log_entry)
print(run.status())
if run.status()["status"] != "FINISHED":
    sys.exit(f"run {RUN_NAME} did not finish: {run.status()['details']}")

# %% [markdown]
# ## Metrics before and after

# %%
run.display_metrics()

# %% [markdown]
# ## Saving and using the model

# %%
artifact = run.save_artifact("clip-model")
print(f"artifact: {artifact}")

text_model = finetuner.get_model(artifact=artifact, select_model="clip-text")
vision_model = finetuner.get_model(artifact=artifact, select_model="clip-vision")

test_da = DocumentArray(Document(text=t) for t, _ in rows("query.csv")[:5])
finetuner.encode(model=text_model, data=test_da)
print(test_da.embeddings.shape)

images = DocumentArray(Document(uri=image_path(p)) for p, _ in rows("index.csv"))
finetuner.encode(model=vision_model, data=images)

# Text-to-image search with the fine-tuned towers: the best image per query.
def normalised(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


scores = normalised(test_da.embeddings) @ normalised(images.embeddings).T
labels = [label for _, label in rows("index.csv")]
for doc, best in zip(test_da, scores.argmax(axis=1)):
    print(f"{doc.text!r:45} -> {labels[best]}")
