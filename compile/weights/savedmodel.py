"""google-research ``run_classifier`` exports: a TF1 SavedModel (``saved_model.pb`` + ``variables/``).

Variables are read from its variables checkpoint; heads, LayerNorm epsilon, GELU and
sequence length from the graph (a ``bert_config.json`` beside it fills in heads/eps where the
graph does not tell them, and is refused where it contradicts the graph).
The demo model writes this format (:func:`..demo_model.save_run_classifier`).
"""

from __future__ import annotations

import math
import pathlib

import numpy as np

from ...common.errors import ModelFormatError
from ._base import (BertWeights, SavedModelSignature, Source, _checkpoint_tensors, _find_vocab, _need, _read_json,
                    shape_from_tensors)
from ..shape import EMBEDDINGS


def _read_savedmodel(path: pathlib.Path, heads: int | None) -> BertWeights:
    meta = _serve_meta_graph(path)
    signature = _classifier_signature(meta, path)
    nodes = {n.name: n for n in meta.graph_def.node}
    notes = []
    prefix = path / "variables" / "variables"
    if not pathlib.Path(str(prefix) + ".index").exists():
        raise ModelFormatError(f"{path} has no variables/variables.index (an incomplete SavedModel)")
    tensors = _checkpoint_tensors(str(prefix))
    if f"{EMBEDDINGS}/word_embeddings" not in tensors and any(
            ".ATTRIBUTES" in name for name in _checkpoint_keys(str(prefix))):
        raise ModelFormatError(f"{path} is a TF2 object-based SavedModel; expected a TF1 run_classifier export "
                               f"(variables named bert/embeddings/word_embeddings, ...)")
    config, config_path = {}, None
    for candidate in (path / "bert_config.json", path.parent / "bert_config.json"):
        if candidate.is_file():
            config, config_path = _read_json(candidate), candidate
            notes.append(f"heads and epsilon from {candidate}")
            break
    word = _need(tensors, f"{EMBEDDINGS}/word_embeddings")
    graph_heads = _heads_from_graph(nodes, int(word.shape[1]))
    # The graph is the model: --heads or a bert_config.json beside it may fill in what it does not
    # tell, never contradict it (another head count is another model).
    for said, by in ((heads, f"--heads {heads}"), (config.get("num_attention_heads"), str(config_path))):
        if said is None:
            continue
        if isinstance(said, bool) or not isinstance(said, int) or said < 1:
            raise ModelFormatError(f"{by}: the number of attention heads must be a whole number >= 1, got {said!r}")
        if graph_heads and said != graph_heads:
            raise ModelFormatError(f"{by} contradicts the graph of {path}, which has {graph_heads} attention heads")
    heads = heads or config.get("num_attention_heads") or graph_heads
    if not heads:
        raise ModelFormatError(f"cannot tell the number of attention heads of {path} from its graph; "
                               f"pass --heads N or put its bert_config.json beside it")
    eps = config.get("layer_norm_eps")
    if eps is not None and (isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1):
        raise ModelFormatError(f"{config_path}: layer_norm_eps must be a small number > 0, got {eps!r}")
    graph_eps = _eps_from_graph(nodes)
    # As for heads: the graph is the model. Another epsilon would rebuild another function, which the
    # proof catches at float32 (2e-4 for 1e-5 against 1e-12) but not within float16's 5e-3, nor at all
    # with --no-verify.
    if eps is not None and graph_eps is not None and not math.isclose(eps, graph_eps, rel_tol=1e-5):
        raise ModelFormatError(f"{config_path}: layer_norm_eps {eps!r} contradicts the graph of {path}, whose "
                               f"LayerNorm epsilon is {graph_eps:.3g}")
    eps = eps or graph_eps
    if eps is None:
        eps = 1e-12  # google-research's fixed LayerNorm epsilon
        notes.append("LayerNorm epsilon not found in the graph; assumed 1e-12 (google-research)")
    shape = shape_from_tensors(tensors, int(heads), float(eps))
    gelu = _gelu_from_graph(nodes, path)
    files = [p for p in path.rglob("*") if p.is_file() and (p.name.startswith("saved_model.") or
                                                             p.parent.name == "variables")]
    if signature.logits:
        notes.append("the serving signature has 'logits' but no 'probabilities'; the proof applies the softmax")
    return BertWeights(shape, tensors, Source(path, "savedmodel", files), gelu, _find_vocab(path),
                       signature=signature, notes=notes)


def _checkpoint_keys(prefix: str) -> list[str]:
    import tensorflow as tf

    return list(tf.train.load_checkpoint(prefix).get_variable_to_shape_map())


def _serve_meta_graph(path: pathlib.Path):
    """The MetaGraphDef tagged 'serve' (parsed from saved_model.pb, nothing executed)."""
    from google.protobuf import text_format
    from tensorflow.core.protobuf import saved_model_pb2

    model = saved_model_pb2.SavedModel()
    pb, pbtxt = path / "saved_model.pb", path / "saved_model.pbtxt"
    try:
        if pb.exists():
            model.ParseFromString(pb.read_bytes())
        else:
            text_format.Parse(pbtxt.read_text(), model)
    except Exception as exc:  # DecodeError, ParseError, OSError
        raise ModelFormatError(f"{path} is not a SavedModel: cannot parse {pb.name}: {exc}") from None
    for meta in model.meta_graphs:
        if "serve" in meta.meta_info_def.tags:
            return meta
    raise ModelFormatError(f"{path} is not a SavedModel for serving: no meta graph tagged 'serve'")


def _classifier_signature(meta, path: pathlib.Path) -> SavedModelSignature:
    sigs = meta.signature_def
    if "serving_default" in sigs:
        sig = sigs["serving_default"]
    elif len(sigs) == 1:
        sig = next(iter(sigs.values()))
    else:
        raise ModelFormatError(f"{path}: no 'serving_default' signature (has {sorted(sigs)})")
    for key in ("input_ids", "input_mask", "segment_ids"):
        if key not in sig.inputs:
            raise ModelFormatError(f"{path}: the serving signature lacks input {key!r} (has {sorted(sig.inputs)}); "
                                   f"expected a run_classifier export")
    # run_classifier exports "probabilities"; an export edited to return only "logits" is the same
    # model before its softmax, which the proof then applies itself.
    output = next((key for key in ("probabilities", "logits") if key in sig.outputs), None)
    if output is None:
        raise ModelFormatError(f"{path}: the serving signature has neither output 'probabilities' nor 'logits' "
                               f"(has {sorted(sig.outputs)}); expected a run_classifier export")
    dims = [d.size for d in sig.inputs["input_ids"].tensor_shape.dim]
    seq = dims[1] if len(dims) == 2 and dims[1] > 0 else None
    return SavedModelSignature({k: v.name for k, v in sig.inputs.items()}, sig.outputs[output].name, seq,
                               logits=output == "logits")


def _const_value(node):
    from tensorflow.python.framework import tensor_util

    if node is None or node.op != "Const":
        return None
    return tensor_util.MakeNdarray(node.attr["value"].tensor)


def _heads_from_graph(nodes: dict, hidden: int) -> int | None:
    """N from a [.., S, N, D] Reshape in layer_0's self-attention (google's transpose_for_scores)."""
    for node in nodes.values():
        if node.op != "Reshape" or not node.name.startswith("bert/encoder/layer_0/attention/self/"):
            continue
        target = nodes.get(node.input[1].split(":")[0].lstrip("^"))
        dims = None
        if target is not None and target.op == "Const":
            dims = [int(v) for v in np.ravel(_const_value(target))]
        elif target is not None and target.op == "Pack":
            values = [_const_value(nodes.get(i.split(":")[0])) for i in target.input]
            dims = [int(v) if v is not None and np.ndim(v) == 0 else -1 for v in values]
        if dims and len(dims) == 4 and dims[2] > 0 and dims[3] > 0 and dims[2] * dims[3] == hidden:
            return dims[2]
    return None


def _eps_from_graph(nodes: dict) -> float | None:
    """The variance epsilon: a small float constant inside the embeddings' LayerNorm scope."""
    for node in nodes.values():
        if node.op == "Const" and node.name.startswith(f"{EMBEDDINGS}/LayerNorm/"):
            value = _const_value(node)
            if value is not None and value.dtype.kind == "f" and value.size == 1 and 0 < float(value) < 1e-2:
                return float(f"{float(value):.6g}")  # 1e-12 stored as float32 reads 9.9999998e-13
    return None


def _gelu_from_graph(nodes: dict, path: pathlib.Path) -> str:
    """Which GELU layer_0's intermediate dense uses, from its op types."""
    ops = {n.op for n in nodes.values() if n.name.startswith("bert/encoder/layer_0/intermediate/")}
    if "Erf" in ops:
        return "erf"
    if "Tanh" in ops:
        return "tanh"
    if "Sigmoid" in ops:
        return "crude"
    raise ModelFormatError(f"{path}: cannot recognise the activation of bert/encoder/layer_0/intermediate "
                           f"(ops {sorted(ops)}); pass --source-gelu erf|tanh|crude")
