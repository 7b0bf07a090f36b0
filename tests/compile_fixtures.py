"""Helpers for the bertpool.compile tests: tiny models in every input format.

Everything here builds tiny models (2 layers x 64 hidden) from seeded random
weights in a second or two; nothing is downloaded.
"""

from __future__ import annotations

import json
import pathlib
import shutil

import numpy as np

from bertpool.compile.build import CompileOptions, compile_model
from bertpool.compile.demo_model import build_demo_model, random_weights
from bertpool.compile.weights import write_checkpoint, write_hf
from bertpool.compile.shape import PRESETS
from bertpool.common.vocab import write_vocab
from bertpool.compile.vocab import generate_vocab

TINY = PRESETS["tiny"]


def quiet_compile(src, out, **kwargs) -> dict:
    """compile_model without progress bars or status lines; returns the manifest."""
    options = CompileOptions(input=pathlib.Path(src), output=pathlib.Path(out), progress=False,
                             log=lambda *a, **k: None, **kwargs)
    return compile_model(options)


def tiny_weights(seed: int = 0) -> dict[str, np.ndarray]:
    return random_weights(TINY, seed)


def make_hf(directory, tensors=None, gelu="erf", with_vocab=True, shape=TINY) -> pathlib.Path:
    tensors = tiny_weights() if tensors is None else tensors
    write_hf(directory, shape, tensors, gelu)
    if with_vocab:
        write_vocab(pathlib.Path(directory) / "vocab.txt", generate_vocab(shape.vocab_size))
    return pathlib.Path(directory)


def make_checkpoint(directory, tensors=None, gelu="tanh", with_vocab=True, shape=TINY) -> pathlib.Path:
    tensors = tiny_weights() if tensors is None else tensors
    write_checkpoint(directory, shape, tensors, gelu)
    if with_vocab:
        write_vocab(pathlib.Path(directory) / "vocab.txt", generate_vocab(shape.vocab_size))
    return pathlib.Path(directory)


def make_savedmodel(directory, gelu="erf", seed=0) -> pathlib.Path:
    return build_demo_model(directory, "tiny", seed=seed, gelu=gelu)


def edit_hf_config(directory, **changes) -> None:
    path = pathlib.Path(directory) / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def copy_tree(src, dst) -> pathlib.Path:
    shutil.copytree(src, dst)
    return pathlib.Path(dst)
