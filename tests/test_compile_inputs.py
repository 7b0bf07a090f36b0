"""bertpool-compile fed what real users have: BERT-like models that are not quite the one it
compiles, and google-research exports edited by hand.

Each must either compile and prove equivalence, or be refused up front with one line naming what
is unsupported (a typed ModelFormatError: exit 2), never a traceback or a silently wrong model.
Everything is tiny and built here from seeded random weights; most cases only read the weights.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

pytest.importorskip("tensorflow")
pytest.importorskip("safetensors")

from compile_fixtures import TINY, edit_hf_config, make_checkpoint, make_hf, quiet_compile, tiny_weights  # noqa: E402

from bertpool.common.errors import ModelFormatError  # noqa: E402
from bertpool.compile import build  # noqa: E402
from bertpool.compile.weights import load_pretrained, load_weights, write_checkpoint  # noqa: E402


def hf_with_head(directory, rows: int) -> pathlib.Path:
    """A tiny HF classifier whose head has ``rows`` outputs."""
    tensors = tiny_weights()
    tensors["output_weights"] = tensors["output_weights"][:1].repeat(rows, axis=0) * np.arange(1, rows + 1)[:, None]
    tensors["output_bias"] = np.zeros([rows], np.float32)
    return make_hf(directory, tensors)


# ------------------------------------------------------------ heads and token types bertpool cannot serve

def test_a_one_output_head_is_refused_up_front(tmp_path):
    """A regression (or multiple-choice) head: softmax over one logit is always 1.0. It was an
    IndexError deep in the proof (exit 3, 'a bug')."""
    src = hf_with_head(tmp_path / "hf", 1)
    with pytest.raises(ModelFormatError, match=r"classifier head has 1 output; bertpool serves classifiers with 2"):
        load_weights(src)


def test_a_three_label_head_is_read_as_three_labels(tmp_path):
    assert load_weights(hf_with_head(tmp_path / "hf", 3)).shape.num_labels == 3


def test_one_token_type_is_refused_up_front(tmp_path):
    """RoBERTa-style type_vocab_size 1: segment id 1 of every pair's second text has no row. It was a
    ValueError from the host embeddings (exit 3)."""
    tensors = tiny_weights()
    tensors["bert/embeddings/token_type_embeddings"] = tensors["bert/embeddings/token_type_embeddings"][:1]
    src = make_hf(tmp_path / "hf", tensors)
    edit_hf_config(src, type_vocab_size=1)
    for load in (load_weights, load_pretrained):  # fine-tuning one would train what compile then refuses
        with pytest.raises(ModelFormatError, match=r"1 token type .* sentence pairs, which need 2"):
            load(src)


# ---------------------------------------------------------------- what config.json says the model is

@pytest.mark.parametrize("problem", ["multi_label_classification", "regression"])
def test_a_problem_type_that_is_no_softmax_is_refused(tmp_path, problem):
    """Same classifier.weight, other meaning (sigmoid per label, or a value): it compiled and was
    served as a softmax."""
    src = make_hf(tmp_path / "hf")
    edit_hf_config(src, problem_type=problem)
    with pytest.raises(ModelFormatError, match=f"problem_type '{problem}' is not supported"):
        load_weights(src)


def drop_config_keys(config_path: pathlib.Path, *keys: str) -> None:
    """Remove ``keys`` from the JSON config at ``config_path`` (config.json, bert_config.json)."""
    config = json.loads(config_path.read_text())
    for key in keys:
        del config[key]
    config_path.write_text(json.dumps(config))


@pytest.mark.parametrize("architecture, drop_model_type", [
    ("RobertaForSequenceClassification", True),  # RoBERTa's names but offset positions: compiled silently
    ("BertForTokenClassification", False),  # was "missing tensor bert.pooler.dense.weight"
    ("BertForMultipleChoice", False),
])
def test_an_architecture_other_than_a_sequence_classifier_is_refused(tmp_path, architecture, drop_model_type):
    src = make_hf(tmp_path / "hf")
    edit_hf_config(src, architectures=[architecture])
    if drop_model_type:
        drop_config_keys(src / "config.json", "model_type")
    with pytest.raises(ModelFormatError, match=rf"architectures \['{architecture}'\] is not "
                                               r"BertForSequenceClassification"):
        load_weights(src)


def test_a_tf_sequence_classifier_architecture_and_none_are_accepted(tmp_path):
    src = make_hf(tmp_path / "hf")
    edit_hf_config(src, architectures=["TFBertForSequenceClassification"])
    assert load_weights(src).shape == TINY
    edit_hf_config(src, architectures=None)
    assert load_weights(src).shape == TINY


def test_config_keys_left_out_take_transformers_defaults(tmp_path):
    """transformers loads a config.json without type_vocab_size etc. with BertConfig's defaults; it
    was refused ('type_vocab_size must be an integer, got None')."""
    src = make_hf(tmp_path / "hf", shape=TINY)
    drop_config_keys(src / "config.json", "type_vocab_size", "max_position_embeddings", "hidden_act", "layer_norm_eps")
    weights = load_weights(src)
    assert weights.shape == TINY and weights.gelu == "erf"
    assert any("type_vocab_size (transformers' default 2 used)" in note for note in weights.notes)


def test_a_default_that_does_not_fit_says_it_was_a_default(tmp_path):
    src = make_hf(tmp_path / "hf")
    drop_config_keys(src / "config.json", "num_attention_heads")
    with pytest.raises(ModelFormatError, match=r"does not divide into 12 attention heads \(config.json lacks "
                                               r"num_attention_heads \(transformers' default 12 used\)\)"):
        load_weights(src)


def test_a_google_config_without_a_key_says_it_lacks_it(tmp_path):
    src = make_checkpoint(tmp_path / "ckpt")
    drop_config_keys(src / "bert_config.json", "num_attention_heads")
    with pytest.raises(ModelFormatError, match="bert_config.json lacks num_attention_heads"):
        load_weights(src)


def test_sharded_torch_weights_are_named(tmp_path):
    """Was the generic "not a SavedModel, a checkpoint or a Hugging Face directory"."""
    src = make_hf(tmp_path / "hf")
    (src / "model.safetensors").rename(src / "pytorch_model-00001-of-00001.bin")
    (src / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {}}))
    with pytest.raises(ModelFormatError, match="Hugging Face directory without model.safetensors"):
        load_weights(src)


# ------------------------------------------------------------------------------------ tokenization

def test_tokenizer_config_casing_contradicting_the_vocabulary_is_refused(tmp_path):
    """The pool decides do_lower_case from the vocabulary; a model trained cased on an uncased-looking
    vocabulary compiled and proved 'equivalent' (both sides got the same wrong tokens)."""
    src = make_hf(tmp_path / "hf")
    (src / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": False}))
    with pytest.raises(ModelFormatError, match=r"says do_lower_case=false, but .* holds no capitals"):
        quiet_compile(src, tmp_path / "out", target="cpu", verify=False)
    assert not (tmp_path / "out").exists()


def test_tokenizer_casing_is_announced_and_agreeing_config_accepted(tmp_path):
    src = make_hf(tmp_path / "hf")
    (src / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True}))
    weights = load_weights(src)
    lines = []
    assert build._tokenizer(src / "vocab.txt", 32, weights, lines.append).do_lower_case is True
    assert lines == [f"  tokenization: uncased (do_lower_case=True, decided from {src / 'vocab.txt'}, "
                     f"as tokenizer_config.json says)"]


def test_no_vocabulary_says_what_hf_directories_hold(tmp_path):
    src = make_hf(tmp_path / "hf", with_vocab=False)
    (src / "tokenizer.json").write_text("{}")
    with pytest.raises(ModelFormatError, match=r"no vocab.txt inside or beside .* \(a tokenizer.json alone"):
        quiet_compile(src, tmp_path / "out", target="cpu", verify=False)


# --------------------------------------------------------------------------- google-research exports

def test_a_checkpoint_under_an_outer_scope_is_read_without_it(tmp_path):
    """model/bert/embeddings/... and model/output_weights: the same model. It was refused as
    'missing tensor output_weights ... not a fine-tuned classifier'."""
    tensors = tiny_weights()
    src = make_checkpoint(tmp_path / "ckpt", {"model/" + k: v for k, v in tensors.items()}, gelu="tanh")
    weights = load_weights(src)
    assert weights.shape == TINY
    assert all(np.array_equal(weights.tensors[k], v) for k, v in tensors.items())
    assert "variables read without their scope 'model/'" in weights.notes


def test_a_checkpoint_of_other_variable_names_says_so(tmp_path):
    tensors = {"encoder/layer_0/kernel": np.zeros([4, 4], np.float32)}
    write_checkpoint(tmp_path / "ckpt", TINY, tensors, "tanh")
    with pytest.raises(ModelFormatError, match=r"has no bert/embeddings/word_embeddings variable \(found "
                                               r"encoder/layer_0/kernel\): not a google-research BERT"):
        load_weights(tmp_path / "ckpt")


def save_logits_only_export(out: pathlib.Path, tensors) -> pathlib.Path:
    """A run_classifier export edited to return 'logits' instead of 'probabilities'."""
    import tensorflow as tf

    from bertpool.common.vocab import write_vocab
    from bertpool.compile.reference import build_reference_graph, load_weights as fill
    from bertpool.compile.vocab import generate_vocab

    v1 = tf.compat.v1
    graph = tf.Graph()
    with graph.as_default():
        h = build_reference_graph(TINY, 32, "erf")
        with v1.Session(graph=graph) as session:
            fill(session, h, tensors)
            sig = v1.saved_model.signature_def_utils.predict_signature_def(
                inputs={"input_ids": h.input_ids, "input_mask": h.input_mask, "segment_ids": h.segment_ids,
                        "label_ids": h.label_ids, "is_real_example": h.is_real_example},
                outputs={"logits": h.logits})
            builder = v1.saved_model.Builder(str(out))
            builder.add_meta_graph_and_variables(session, ["serve"], signature_def_map={"serving_default": sig})
            builder.save()
    write_vocab(out / "vocab.txt", generate_vocab(TINY.vocab_size))
    return out


def test_a_savedmodel_with_logits_but_no_probabilities_compiles_and_proves(tmp_path):
    """Was refused ('lacks output probabilities'); it is the same model before its softmax."""
    src = save_logits_only_export(tmp_path / "sm", tiny_weights())
    manifest = quiet_compile(src, tmp_path / "out", target="cpu", seq_length=32, seq_buckets=(), pairs=4)
    eq = manifest["equivalence"]
    assert eq["passed"] and eq["max_abs_diff"] <= 1e-5
    assert eq["original"] == "the SavedModel (TF1 loader, Session, softmax of its logits)"
